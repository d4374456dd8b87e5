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


def test_a_remote_store_s_result_is_found_by_its_address_from_any_folder(tmp_path, monkeypatch, served):
    """A result's record keeps a remote store's address as it is: a later napari started in another folder finds it
    (read as a path, the address named a folder under the one napari was started from); another address is another
    image."""
    import zarr

    from napari_clearclip.tiled_edits import (another_file, image_changed_since, keep_result_record, result_record,
                                              same_image_file)

    pytest.importorskip("aiohttp")
    site = tmp_path / "site"
    zarr.create_array(str(site / "idr" / "slide.zarr"), shape=(8, 8), chunks=(4, 4), dtype=np.uint8)[:] = 3
    server = served(site)
    address = f"{server}/idr/slide.zarr"
    store = tmp_path / "result.zarr"
    zarr.open_group(str(store), mode="w")
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    keep_result_record(store, address + "/", ["cell", "background"])
    record = result_record(store)
    assert record["source"] == address and record["size"] is None and record["chunks"].startswith("chunks:")
    monkeypatch.chdir(tmp_path)
    assert same_image_file(record, address) and same_image_file(record, address + "/")
    assert not image_changed_since(store, address)
    assert not same_image_file(record, f"{server}/idr/other/slide.zarr")
    assert another_file(record, f"{server}/mirror/idr/slide.zarr")
    assert not same_image_file(record, str(first / "http:" / server.split("//")[1] / "idr" / "slide.zarr"))


@pytest.mark.parametrize("layout", ["zarr v3", "zarr v2", "sharded", "OME-Zarr group", "OME-Zarr group, unlisted"])
def test_a_remote_store_written_again_is_not_the_image_its_strokes_were_painted_on(tmp_path, served, layout):
    """A web server lists no folder and tells no time of one: a remote store is known by its metadata and chunks
    spread over it. Written again with other pixels, other metadata or more chunks, at the same address and of the
    same shape, it is another image (its strokes no longer teach); written again with the same content, or read
    again, it is the same. One that cannot be read is not taken as written again (the run reading it fails: a
    moment's network failure costs no strokes). A record of the previous version tells nothing."""
    import zarr

    from napari_clearclip.tiled_edits import RESULT_RECORD_KEY, image_changed_since, keep_result_record, result_record
    from napari_clearclip.zarr_images import SAMPLED_CHUNKS

    pytest.importorskip("aiohttp")
    pixels = np.random.default_rng(3).integers(0, 255, (96, 96), dtype=np.uint8)
    pixels[:, 80:] = 0   # chunks of the fill value: not written

    def write(values, attributes=None):
        where = str(tmp_path / "slide.zarr")
        if layout.startswith("OME-Zarr group"):
            group = zarr.open_group(where, mode="w")
            group.attrs.update(attributes or {"multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}]}]})
            group.create_array("0", data=values, chunks=(8, 8), write_data=True)
            group.create_array("1", data=values[::2, ::2], chunks=(8, 8))
            return
        options = {"zarr v2": {"zarr_format": 2}, "sharded": {"shards": (32, 32)}}.get(layout, {})
        array = zarr.create_array(where, data=values, chunks=(8, 8), overwrite=True, **options)
        if attributes:
            array.attrs.update(attributes)

    write(pixels)
    address = f"{served(tmp_path, listing=not layout.endswith('unlisted'))}/slide.zarr"
    result = tmp_path / "result.zarr"
    zarr.open_group(str(result), mode="w")
    served.requested.clear()
    keep_result_record(result, address, ["cell", "background"])
    chunks = {path for path in served.requested   # (not metadata, nor a folder's listing)
              if not path.endswith("/") and not path.rsplit("/", 1)[-1].startswith((".z", "zarr.json"))}
    assert 0 < len(chunks) <= SAMPLED_CHUNKS, chunks
    if layout.startswith("OME-Zarr"):   # the smallest level's: the whole image in the fewest bytes
        assert all(path.startswith("/slide.zarr/1/") for path in chunks), chunks
    assert not image_changed_since(result, address)
    write(pixels.copy())
    assert not image_changed_since(result, address), "the same content written again"
    for other in (255 - pixels, np.where(np.arange(96) >= 80, 7, pixels).astype(np.uint8)):
        write(other)
        assert image_changed_since(result, address)
    write(pixels, {"scale": [2, 2]} if not layout.startswith("OME-Zarr") else {"multiscales": [], "scale": [2, 2]})
    assert image_changed_since(result, address), "other metadata"
    write(pixels)
    assert not image_changed_since(result, address)
    last = pixels.copy()
    last[-2, -2] = 1   # in the last chunk of each level, always one of the SAMPLED_CHUNKS read
    write(last)
    assert image_changed_since(result, address)
    assert SAMPLED_CHUNKS < (48 // 8) ** 2 < (96 // 8) ** 2

    import shutil

    shutil.rmtree(tmp_path / "slide.zarr")
    assert not image_changed_since(result, address), "a store that cannot be read (the run reading it fails)"
    record = result_record(result)
    record.pop("chunks")
    zarr.open_group(str(result), mode="r+").attrs[RESULT_RECORD_KEY] = record
    assert not image_changed_since(result, address), "a record of the previous version"


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


def test_a_remote_group_is_told_without_walking_what_lies_below_its_image(tmp_path, served):
    """A group without OME-Zarr levels is told by the members listed directly under it (a plate of thousands of wells
    would cost a request each), and its image's chunks still tell it written again."""
    import zarr

    from napari_clearclip.zarr_images import remote_store_identity

    pytest.importorskip("aiohttp")
    group = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w")
    image = group.create_array("image", data=np.arange(256, dtype=np.uint8).reshape(16, 16), chunks=(8, 8))
    row = group.create_group("A")
    for well in range(5):
        row.create_group(str(well)).create_array("0", shape=(4, 4), dtype=np.uint8)
    address = f"{served(tmp_path)}/plate.zarr"
    served.requested.clear()
    before = remote_store_identity(address)
    below = [path for path in served.requested if path.startswith("/plate.zarr/A/") and path != "/plate.zarr/A/zarr.json"]
    assert not below, below
    image[0, 0] = 255
    assert remote_store_identity(address) != before


def test_chunks_a_remote_store_lacks_are_counted_only_where_its_server_lists_folders(tmp_path, served):
    """A store on a server that lists folders (as object stores do) is refused for a chunk it lacks, as a local one
    is; on one that lists none (most web servers) zarr counts no chunk as stored, so nothing is counted (not every
    chunk said missing) and the image is read, its lacking chunks as the fill value."""
    import zarr

    from napari_clearclip.errors import InvalidImageError
    from napari_clearclip.image_locations import RemoteStore
    from napari_clearclip.zarr_images import absent_chunk_count, open_zarr_image

    array = zarr.create_array(str(tmp_path / "slide.zarr"), shape=(300, 260, 3), chunks=(128, 128, 3), dtype=np.uint8)
    array[:] = 9
    os.remove(tmp_path / "slide.zarr" / "c" / "1" / "1" / "0")
    listed, unlisted = (served(tmp_path, listing=listing) + "/slide.zarr" for listing in (True, False))
    assert absent_chunk_count(zarr.open(listed, mode="r")) == (1, 9)
    with pytest.raises(InvalidImageError, match=f"The zarr store {listed} lacks 1 of its 9 chunks"):
        open_zarr_image(RemoteStore(listed))
    assert absent_chunk_count(zarr.open(unlisted, mode="r")) is None
    image = np.asarray(open_zarr_image(RemoteStore(unlisted)))
    assert (image[128:256, 128:256] == 0).all() and (image[:128] == 9).all()
    assert location_name("https://host/data/slide.zarr/?X-Amz-Signature=abc#top") == "slide.zarr"


def test_a_tiff_read_lazily_through_tifffile_is_known_by_its_file_and_series(tmp_path):
    """``tifffile.imread(path, aszarr=True)`` reads a large TIFF as a zarr store: its arrays are known by the file
    (so their results are found again) and its series by their number, at any level, read directly or through
    ``dask.array.from_zarr``; its tiles, which that store does not list, are not counted as missing."""
    import dask.array as da
    import tifffile
    import zarr

    from napari_clearclip.zarr_images import absent_chunk_count, array_path, store_location

    rng = np.random.default_rng(3)
    path = tmp_path / "scan.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        for _ in range(2):
            picture = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
            tiff.write(picture, tile=(64, 64), photometric="rgb", subifds=1)
            tiff.write(picture[::2, ::2].copy(), tile=(64, 64), photometric="rgb", subfiletype=1)
    for series in (0, 1):
        levels = zarr.open(tifffile.imread(path, aszarr=True, series=series), mode="r")
        arrays = [levels["0"], levels["1"], da.from_zarr(levels["1"]),
                  zarr.open(tifffile.imread(path, aszarr=True, series=series, level=1), mode="r")]
        assert [store_location(array) for array in arrays] == [str(path.resolve())] * 4
        assert [array_path(array) for array in arrays] == [f"series {series}"] * 4
        assert absent_chunk_count(levels["0"]) is None
    pages = zarr.open(tifffile.imread(path, aszarr=True, key=0), mode="r")   # pages by number: not a known image
    assert store_location(pages) is None and array_path(pages) is None and absent_chunk_count(pages) is None
    memory = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=(128, 128), chunks=(64, 64), dtype="u1")
    memory[:64, :64] = 1
    assert store_location(memory) is None and absent_chunk_count(memory) == (3, 4)   # a store that lists its chunks


def test_whether_a_store_holds_another_image_of_an_image_s_shape(tmp_path, served):
    """Labels that record no place in their store (saved by earlier versions) are of an image only where its store
    holds no other image of its shape: two images of one size in a group or a collection do; a pyramid's levels, a
    collection's smaller macro image, a store that is one array, do not (in zarr's formats 3 and 2); an image of no
    local zarr store (remote stores are not walked), a TIFF's series read through tifffile (told by their number),
    or a store of more folders than are looked through, cannot tell."""
    import dask.array as da
    import tifffile
    import zarr

    from napari_clearclip.zarr_images import store_has_image_alike

    pair = zarr.open_group(str(tmp_path / "pair.zarr"), mode="w")
    for name in ("0", "1"):
        pair.create_array(name, shape=(32, 48, 3), chunks=(16, 16, 3), dtype=np.uint8)
    pyramid = zarr.open_group(str(tmp_path / "pyramid.zarr"), mode="w")
    for name, shape in (("0", (32, 48)), ("1", (16, 24)), ("2", (8, 12))):
        pyramid.create_array(name, shape=shape, chunks=(8, 8), dtype=np.uint8)
    collection = zarr.open_group(str(tmp_path / "collection.zarr"), mode="w")
    for series, shape in (("0", (32, 48)), ("1", (32, 48)), ("2", (10, 10))):
        collection.create_group(series).create_array("0", shape=shape, chunks=(8, 8), dtype=np.uint8)
    slide = zarr.open_group(str(tmp_path / "slide.zarr"), mode="w")
    for series, shape in (("0", (32, 48)), ("1", (10, 10))):
        slide.create_group(series).create_array("0", shape=shape, chunks=(8, 8), dtype=np.uint8)
    alone = zarr.create_array(str(tmp_path / "alone.zarr"), shape=(32, 48), chunks=(8, 8), dtype=np.uint8)
    assert store_has_image_alike(pair["1"]) is True
    assert store_has_image_alike(da.from_zarr(str(tmp_path / "pair.zarr"), component="0")) is True
    assert store_has_image_alike(da.from_zarr(str(tmp_path / "collection.zarr"), component="1/0")) is True
    assert store_has_image_alike(collection["2/0"]) is False
    assert store_has_image_alike(da.from_zarr(str(tmp_path / "slide.zarr"), component="0/0")) is False
    assert [store_has_image_alike(pyramid[name]) for name in "012"] == [False] * 3
    assert store_has_image_alike(alone) is False
    assert store_has_image_alike(np.zeros((32, 48), np.uint8)) is None
    assert store_has_image_alike(da.from_zarr(str(tmp_path / "pair.zarr"), component="0") + 1) is None

    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        for shape in ((64, 64), (64, 64), (32, 32)):
            tiff.write(np.zeros(shape, np.uint8), tile=(32, 32))
    assert [store_has_image_alike(zarr.open(tifffile.imread(path, aszarr=True, series=series), mode="r"))
            for series in range(3)] == [None] * 3   # (labels of no series are of its first)

    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)   # (OME-Zarr 0.4's format)
    for name, shape in (("A/1/0/0", (32, 48)), ("A/1/0/1", (16, 24)), ("A/2/0/0", (32, 48))):
        old.create_array(name, shape=shape, chunks=(8, 8), dtype=np.uint8)[:] = 1
    old.create_array("B/0", shape=(10, 10), chunks=(8, 8), dtype=np.uint8)
    assert store_has_image_alike(old["A/1/0/0"]) is True and store_has_image_alike(old["A/1/0/1"]) is False
    assert store_has_image_alike(old["B/0"]) is False
    plate = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w")   # more folders than are looked through
    for well in range(300):
        plate.create_array(f"{well}/0", shape=(8, 8 + well), chunks=(8, 8), dtype=np.uint8)
    assert store_has_image_alike(plate["0/0"]) is None

    pytest.importorskip("aiohttp")
    for listing in (True, False):   # remote stores are not walked
        address = served(tmp_path, listing=listing)
        assert store_has_image_alike(zarr.open_group(f"{address}/pair.zarr", mode="r")["1"]) is None
