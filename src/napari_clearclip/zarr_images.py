"""Zarr images read lazily: plain arrays, and OME-Zarr multiscale groups (their levels, the full-resolution first).

OME-Zarr keeps channels first ((c, y, x), or (t, c, z, y, x) with length-1 axes); the engine takes
(y, x) or (y, x, channels). :class:`ChannelsLast` gives that view without reading anything: only
the rows and columns a tile asks for are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageNotFoundError, InvalidImageError, InvalidOptionError, StoreUnreachableError
from .image_locations import RemoteStore, remote_address


#: Seconds a web server may stay silent (while a connection opens, or between the bytes of an answer) before reading a
#: store from it fails: a stalled server fails the run instead of holding it for aiohttp's five minutes a request.
REMOTE_SILENCE_SECONDS = 60.0


def remote_options(address: str) -> dict:
    """fsspec's options for reading the store at ``address``: a limit on a silent web server (``http(s)://``); object
    stores' own clients bound their waits."""
    if address.split("://", 1)[0].lower() not in ("http", "https"):
        return {}
    import aiohttp

    seconds = REMOTE_SILENCE_SECONDS
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)}}


def _open_node(path):
    """``zarr.open`` read-only, a store at an address with :func:`remote_options`."""
    import zarr

    if isinstance(path, RemoteStore):
        return zarr.open(path.address, mode="r", storage_options=remote_options(path.address) or None)
    return zarr.open(str(path), mode="r")


def is_zarr_path(path: Path | RemoteStore) -> bool:
    """A folder that is a zarr store (v2 or v3 metadata inside), e.g. ``image.zarr``; a store at an address (only
    zarr stores are read from addresses)."""
    if isinstance(path, RemoteStore):
        return True
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


class ChannelsLast:
    """A read-only (y, x[, c]) view of a zarr array whose axes are named (OME-Zarr); length-1 axes dropped."""

    def __init__(self, array, axes: list[str]):
        self.array = array
        names = [a.lower() for a in axes]
        if "y" not in names or "x" not in names:
            raise InvalidImageError(f"The OME-Zarr image has axes {axes}: it needs y and x.")
        extra = [i for i, a in enumerate(names) if a not in ("y", "x", "c") and array.shape[i] > 1]
        if extra:
            raise InvalidImageError(f"The OME-Zarr image has axes {axes} of shape {tuple(array.shape)}: segment one "
                                    "time point or z plane at a time (export a 2-D image).")
        self._y, self._x = names.index("y"), names.index("x")
        self._c = names.index("c") if "c" in names and array.shape[names.index("c")] > 1 else None
        shape = [array.shape[self._y], array.shape[self._x]]
        if self._c is not None:
            shape.append(array.shape[self._c])
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(array.dtype), len(shape)

    @property
    def chunks(self) -> tuple:
        """The store's chunk shape along this view's axes (to read it in bands of whole chunks)."""
        chunks = self.array.chunks
        return tuple(chunks[i] for i in (self._y, self._x, self._c) if i is not None)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        rows = key[0] if len(key) > 0 else slice(None)
        cols = key[1] if len(key) > 1 else slice(None)
        index = [0] * self.array.ndim
        index[self._y], index[self._x] = rows, cols
        if self._c is not None:
            index[self._c] = slice(None)
        values = np.asarray(self.array[tuple(index)])
        if self._c is not None:  # the channel axis goes last, after y and x
            order = sorted([self._y, self._x, self._c])
            values = np.moveaxis(values, order.index(self._c), -1)
        return values

    def __array__(self, dtype=None, copy=None):
        values = self[:, :]
        return values if dtype is None else values.astype(dtype)


#: What a run does with chunks that a zarr image's store lacks: refuse the image (a copy that lost chunks would
#: otherwise be segmented as if they held the fill value), or read them as the fill value, as zarr does.
ABSENT_CHUNKS = ("error", "fill")


def check_absent_chunks(image, name: str | None = None, absent_chunks: str = "error") -> None:
    """Refuse a zarr image whose store lacks chunks, unless ``absent_chunks="fill"`` (and first, one of a type no run
    takes); other images pass.

    zarr reads a chunk that is not in the store as the array's fill value, without a word, and zarr 3
    leaves out the chunks that hold only that value when it writes (``write_empty_chunks=False``). A
    store can lack chunks either way, so only the user can say whether that is how it was written.
    """
    if absent_chunks not in ABSENT_CHUNKS:
        raise InvalidOptionError(f"absent_chunks={absent_chunks!r}: use 'error' (refuse a zarr image whose store "
                                 "lacks chunks) or 'fill' (read them as its fill value).")
    if image is not None and np.dtype(getattr(image, "dtype", np.float64)).kind not in "uif":
        # a type no run takes is said first: copying the store again for its chunks would not help
        where = f"The zarr store {name}" if name else "The zarr array"
        raise InvalidImageError(f"{where} holds {np.dtype(image.dtype)} values: not supported; use uint8, uint16 "
                                "or float.")
    if absent_chunks == "fill":
        return
    counted = absent_chunk_count(image)
    if counted is None or not counted[0]:
        return
    array = image.array if isinstance(image, ChannelsLast) else image
    absent, total = counted
    name = f"The zarr store {name}" if name else f"The zarr array at {array.store_path}"
    raise InvalidImageError(
        f"{name} lacks {absent} of its {total} chunks. zarr reads a missing chunk as the "
        f"fill value ({array.fill_value}), so if chunks were lost (an interrupted copy, say) the labels there "
        "would be wrong. Copy the store again; or, if it leaves out the chunks that hold only the fill value "
        "(zarr 3 writes that way by default), segment it with absent_chunks='fill' (command line: "
        "--absent-chunks fill).")


def local_store_root(image) -> Path | None:
    """The folder of the local zarr store a zarr array is read from (the store a script or napari's console opened:
    the image's file, as a reader would name it), also through ``dask.array.from_zarr``; None for anything else
    (arrays in memory, dask arrays made otherwise or changed since, remote stores)."""
    location = store_location(image)
    return None if location is None or remote_address(location) is not None else Path(location)


def store_location(image) -> str | None:
    """Where the zarr store a zarr array is read from lies, also through ``dask.array.from_zarr``: the folder of a
    local store, or the address of a remote one (``https://``, ``s3://``...: the image's file, as napari-ome-zarr
    would name it), or the TIFF file tifffile reads as a zarr store (``tifffile.imread(path, aszarr=True)``, a large
    TIFF read lazily); None for anything else (arrays in memory, zarr's and fsspec's memory stores, dask arrays made
    otherwise or changed since)."""
    try:
        from zarr.storage import LocalStore

        array = _zarr_array_of(image)
        if array is None:
            return None
        tiff = tiff_series_of(array)
        if tiff is not None:
            return tiff[0]
        if isinstance(array.store, LocalStore):
            return str(Path(array.store.root))
        fs, path = getattr(array.store, "fs", None), getattr(array.store, "path", None)   # (fsspec's, as dask opens)
        if fs is None or not isinstance(path, str):
            return None
        protocol = fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())
        if "file" in protocols or "local" in protocols:
            return str(Path(path))
        return remote_address(fs.unstrip_protocol(path))
    except Exception:  # noqa: BLE001 - a store that cannot tell where it is: no file known
        return None


def array_path(image) -> str | None:
    """The path, within its store, of the zarr array an image is read from (``"1/0"``: the full level of a
    collection's second image), also through ``dask.array.from_zarr``; None for anything else. Two images of one
    store (a bioformats2raw collection's series, opened by a reader plugin at the store's root) share the store's
    location as their file, and are told apart by it. A TIFF file's series read through tifffile as a zarr store
    are told apart by their number (``"series 1"``), whichever of its levels is read."""
    try:
        array = _zarr_array_of(image)
        if array is None:
            return None
        if _read_by_tifffile(array):   # a TIFF's series by its number; pages read by number are no known image
            tiff = tiff_series_of(array)
            return None if tiff is None else f"series {tiff[1]}"
        return str(array.path)
    except Exception:  # noqa: BLE001 - an array that cannot tell where it is
        return None


#: The most folders of a store looked at to find another image of an image's shape: a store with more (a plate of
#: hundreds of wells) cannot tell whether it holds one (its walk would hold napari's window for a moment).
STORE_FOLDERS_LOOKED_AT = 500


def store_has_image_alike(image) -> bool | None:
    """Whether the local zarr store an image's array is read from holds another array of its shape, which labels
    recording no place in the store (those saved by earlier versions) could label as well; False where the store
    holds no other; None for an image read from no local zarr store (remote stores, and a TIFF's series through
    tifffile's zarr view, included), or from a store too large to look through."""
    import json
    import os

    try:
        array = _zarr_array_of(image)
        if array is None or _read_by_tifffile(array):   # (a TIFF's series: labels of none are of its first)
            return None
        if str(array.path).strip("/") == "":   # the store is this array alone
            return False
        root = local_store_root(array)
        if root is None:
            return None
        own, shape, looked_at = str(array.path).strip("/"), list(array.shape), 0
        for folder, children, files in os.walk(root):
            looked_at += 1
            if looked_at > STORE_FOLDERS_LOOKED_AT:
                return None
            found = None
            for name in ("zarr.json", ".zarray"):
                if name in files:
                    found = json.loads((Path(folder) / name).read_text())
                    break
            if found is None or (name == "zarr.json" and found.get("node_type") != "array"):
                continue
            children[:] = []   # an array's folder holds its chunks only
            if found.get("shape") == shape and Path(folder).relative_to(root).as_posix() != own:
                return True
        return False
    except Exception:  # noqa: BLE001 - a store that cannot be looked through: not known to hold one image only
        return None


def _read_by_tifffile(array) -> bool:
    """Whether a zarr array's store is tifffile's view of a TIFF file (whose tiles it does not list)."""
    return type(getattr(array, "store", None)).__module__.split(".")[0] == "tifffile"


def tiff_series_of(array) -> tuple[str, int] | None:
    """(the file, the series' number in it) of a zarr array tifffile reads from a TIFF file on disk
    (``zarr.open(tifffile.imread(path, aszarr=True, series=n))``, at any of its levels); None for any other array,
    and for pages read by their number (``key=``), which are not known as one of the file's images."""
    if not _read_by_tifffile(array):
        return None
    store = array.store
    try:   # the series (or its levels) the store reads: tifffile names them for no public use
        first = store._data[0]
        parent = first.parent
        index = next(number for number, series in enumerate(parent.series)
                     if series is first or any(level is first for level in series.levels))
        path = Path(parent.filehandle.path)
    except Exception:  # noqa: BLE001 - a tifffile of another shape: no file known
        return None
    return (str(path.resolve()), index) if path.is_file() else None


def _zarr_array_of(image):
    """The zarr array an image is read from: itself, the array a :class:`ChannelsLast` view or a dask array read as
    it is (:func:`_zarr_read_by`) reads; None for anything else."""
    import zarr

    array = image.array if isinstance(image, ChannelsLast) else image
    if not isinstance(array, zarr.Array):
        array = _zarr_read_by(array)
    return array if isinstance(array, zarr.Array) else None


def _zarr_read_by(array):
    """The zarr array a dask array reads as it is (``dask.array.from_zarr``, with nothing done to it since: its
    graph holds that array and the chunks read from it, of its shape and type); None for anything else."""
    import zarr

    name, layers = getattr(array, "name", None), getattr(getattr(array, "dask", None), "layers", None)
    if not isinstance(name, str) or layers is None or len(layers) != 2 or name not in layers:
        return None
    original = layers.get("original-" + name)
    if original is None or len(original) != 1:
        return None
    [source] = list(original.values())
    if (isinstance(source, zarr.Array) and tuple(source.shape) == tuple(array.shape)
            and np.dtype(source.dtype) == np.dtype(array.dtype)):
        return source
    return None


def absent_chunk_count(image) -> tuple[int, int] | None:
    """(chunks not in the store, chunks in all) of a zarr image; None for anything else, or a store that cannot
    list its chunks (some remote ones)."""
    array = image.array if isinstance(image, ChannelsLast) else image
    try:
        import zarr

        if not isinstance(array, zarr.Array):
            return None
        total, stored = int(array.nchunks), int(array.nchunks_initialized)
    except Exception:  # noqa: BLE001 - whatever the store raises, there is nothing to count
        return None
    if _read_by_tifffile(array):   # a TIFF file's tiles, each there, that its store does not list
        return None
    if stored < total and not _lists_its_folders(array):
        return None
    return max(0, total - stored), total


def _lists_its_folders(array) -> bool:
    """Whether the store of a zarr array lists the array's folder (its metadata file among what it lists): local
    stores and object stores do; most web servers list no folder, and zarr then counts no chunk as stored."""
    location = store_location(array)
    if location is None or remote_address(location) is None:
        return True
    try:
        import fsspec

        fs, folder = fsspec.core.url_to_fs("/".join(part for part in (location, array.path) if part),
                                           **remote_options(location))
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(folder, detail=False)}
    except Exception:  # noqa: BLE001 - a folder the store cannot list
        return False
    return bool(names & {"zarr.json", ".zarray"})


def open_zarr_image(path: Path | RemoteStore, absent_chunks: str = "error"):
    """The image in a zarr store (a folder, or a store at an address), unread: an array, or a multiscale group's first
    (full-resolution) level, checked for chunks missing from the store (see :func:`check_absent_chunks`)."""
    path = path if isinstance(path, RemoteStore) else Path(path)
    image = _zarr_image(path)
    check_absent_chunks(image, str(path), absent_chunks)
    return image


def open_zarr_levels(path: Path | RemoteStore) -> list:
    """The image in a zarr store, unread, at every resolution it holds: an OME-Zarr multiscale group's levels,
    finest first (each seen as :func:`open_zarr_image` sees the first), or a one-item list. Missing chunks are not
    checked here: check the level that is read (:func:`check_absent_chunks`)."""
    return _zarr_levels(path if isinstance(path, RemoteStore) else Path(path))


def _zarr_image(path: Path | RemoteStore):
    return _zarr_levels(path)[0]


def _zarr_levels(path: Path | RemoteStore) -> list:
    import zarr

    if not isinstance(path, RemoteStore) and not path.exists():
        raise ImageNotFoundError(f"No such zarr store: {path}")
    try:
        node = _open_node(path)
    except FileNotFoundError:
        raise no_store_at(str(path)) from None
    except OSError as exc:
        if isinstance(path, RemoteStore):   # a connection refused or reset, a time limit
            raise StoreUnreachableError(f"The zarr store at {path} cannot be read now: "
                                        f"{exc or type(exc).__name__}") from None
        raise InvalidImageError(f"Could not open {path} as a zarr store: {exc}") from None
    except Exception as exc:
        raise InvalidImageError(f"Could not open {path} as a zarr store: {exc}") from None
    if isinstance(node, zarr.Array):
        return [node]
    if "plate" in _ome_attributes(node):
        raise InvalidImageError(f"{path} is a plate (OME-Zarr HCS): name one field's image, e.g. {path}/A/1/0.")
    series = collection_images(node)
    if series:   # a bioformats2raw collection: its first image, as napari-ome-zarr shows it first
        node = node[series[0]]
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if multiscales:
        first = multiscales[0]
        axes = [a["name"] if isinstance(a, dict) else a for a in first.get("axes", [])]
        levels = []
        for dataset in first["datasets"]:
            array = node[dataset["path"]]
            if axes and (len(axes) != array.ndim or [a.lower() for a in axes][-2:] != ["y", "x"] or array.ndim > 2):
                array = ChannelsLast(array, axes)
            levels.append(array)
        return levels
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        return [node[arrays[0]]]
    raise InvalidImageError(f"{path} is a zarr group with {len(arrays)} arrays and no OME-Zarr multiscales: "
                            "name the array's own folder.")


def _ome_attributes(group) -> dict:
    """A group's OME-Zarr attributes: its own (NGFF 0.4 and earlier) and those under ``ome`` (0.5)."""
    attributes = dict(group.attrs)
    ome = attributes.get("ome")
    return {**attributes, **ome} if isinstance(ome, dict) else attributes


def collection_images(group) -> list[str]:
    """The paths of the images in a bioformats2raw collection (``bioformats2raw.layout``, as bioformats2raw converts a
    microscope's or slide scanner's file: a slide's full image first, then its macro and label images, say): those
    its ``OME`` group lists (``series``), else ``0``, ``1`` ... while they exist (found without listing a folder, as
    most web servers list none); [] for any other group."""
    import zarr

    if "bioformats2raw.layout" not in _ome_attributes(group):
        return []
    try:
        listed = _ome_attributes(group["OME"]).get("series") if "OME" in group else None
    except Exception:  # noqa: BLE001 - an OME group that cannot be read lists nothing
        listed = None
    if isinstance(listed, list) and listed:
        return [str(name).strip("/") for name in listed]
    found = []
    while str(len(found)) in group and isinstance(group[str(len(found))], zarr.Group):
        found.append(str(len(found)))
    return found


def collection_note(path: Path | RemoteStore) -> str:
    """What a run says of a bioformats2raw collection of several images, of which it segments the first; "" for any
    other store (or one that cannot be read: reading it says why)."""
    import zarr

    try:
        node = _open_node(path)
        series = collection_images(node) if isinstance(node, zarr.Group) else []
    except Exception:  # noqa: BLE001 - said where the image is read
        return ""
    if len(series) < 2:
        return ""
    return (f"a collection of {len(series)} images ({', '.join(series)}): its first was segmented; name "
            f"{str(path).rstrip('/')}/{series[1]} (and so on) to segment another")


def no_store_at(address: str) -> ImageNotFoundError:
    """The error of an address where no zarr store is."""
    return ImageNotFoundError(f"No zarr store at {address} (zarr.json, .zarray or .zgroup not found there)")


def ome_placement(path: Path) -> dict | None:
    """Where an OME-Zarr image's full-resolution pixels sit, along y and x: ``{"scale": [y, x], "translation":
    [y, x], "units": [y, x], "shape": [height, width]}`` (a unit None where the axis names none); None for a plain
    array, a store without multiscales, or metadata this cannot read."""
    import zarr

    try:
        node = _open_node(path)
        if isinstance(node, zarr.Array):
            return None
        series = collection_images(node)
        node = node[series[0]] if series else node
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        first = multiscales[0]
        axes = [a if isinstance(a, dict) else {"name": a} for a in first.get("axes", [])]
        names = [str(a.get("name", "")).lower() for a in axes]
        rows, cols = names.index("y"), names.index("x")
        dataset = first["datasets"][0]
        scale, translation = np.ones(len(axes)), np.zeros(len(axes))
        # the dataset's transformations, then the multiscale's own (applied after them)
        for transform in [*dataset.get("coordinateTransformations", []), *first.get("coordinateTransformations", [])]:
            if transform.get("type") == "scale":
                values = np.asarray(transform["scale"], float)
                scale, translation = scale * values, translation * values
            elif transform.get("type") == "translation":
                translation = translation + np.asarray(transform["translation"], float)
        shape = node[dataset["path"]].shape
    except Exception:
        return None
    if len(scale) != len(axes) or len(shape) != len(axes) or min(scale[rows], scale[cols]) <= 0:
        return None
    return {"scale": [float(scale[rows]), float(scale[cols])],
            "translation": [float(translation[rows]), float(translation[cols])],
            "units": [axes[rows].get("unit"), axes[cols].get("unit")], "shape": [int(shape[rows]), int(shape[cols])]}


def store_identity(path: Path) -> dict:
    """A zarr store's identity for run records: its total size, newest modification time, and a hash of its
    files' names, sizes and times (hashing every chunk's content would read the whole image again)."""
    import hashlib

    digest = hashlib.sha256()
    size, newest = 0, 0
    for item in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        stat = item.stat()
        size, newest = size + stat.st_size, max(newest, stat.st_mtime_ns)
        digest.update(f"{item.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"size": size, "mtime_ns": newest, "sha256": "tree:" + digest.hexdigest()}


#: Chunks of a remote store read to tell whether it was written again, evenly spread over the array sampled (the
#: first and the last included; an OME-Zarr pyramid's smallest level, else the largest array): reading them all would
#: cost what a run does.
SAMPLED_CHUNKS = 16


def remote_store_identity(address: str) -> dict:
    """A remote zarr store's identity for run records (``chunks``): a SHA-256 of its arrays' and groups' metadata
    (shapes, types, attributes; of the levels OME-Zarr metadata names, else of the members listed under it) and of the
    stored bytes of :data:`SAMPLED_CHUNKS` chunks (a missing one counted as missing), read concurrently, spread over the
    smallest level of an OME-Zarr pyramid (the whole image in few chunks: a slide's level 0 would have a few MB read
    for each chunk, on every run), else over its largest array. A web server tells no time for a folder, and lists
    none: a store written again at the same address with the same shape is told by its contents. Raises OSError
    where the store cannot be read."""
    import hashlib
    import json

    import zarr

    try:
        opened = zarr.open(address, mode="r", storage_options=remote_options(address) or None)
        members, levels = _group_members(opened) if isinstance(opened, zarr.Group) else ([], [])
        digest = hashlib.sha256(b"napari-clearclip remote zarr store\n")
        for name, node in sorted([("", opened)] + members, key=lambda item: item[0]):
            digest.update(f"{name}\0{json.dumps(node.metadata.to_dict(), sort_keys=True, default=str)}\n".encode())
        arrays = [node for _, node in members if isinstance(node, zarr.Array)]
        if isinstance(opened, zarr.Array):
            arrays = [opened]
        if arrays:
            pick = min if levels else max
            sampled = pick(arrays, key=lambda array: (array.nbytes, array.path))
            for key, stored in zip(*_sampled_chunks(address, sampled)):
                digest.update(f"{key}\0".encode())
                digest.update(b"\0missing" if stored is None else hashlib.sha256(stored).digest())
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - zarr's and fsspec's own errors of an unreadable store, time limits
        raise OSError(f"The zarr store at {address} cannot be read: {error or type(error).__name__}") from error
    return {"chunks": "chunks:" + digest.hexdigest()}


def _group_members(group) -> tuple[list[tuple[str, object]], list[str]]:
    """The arrays and groups whose metadata tells a group's image, and the paths of its levels: the levels its OME-Zarr
    metadata names (``multiscales``, also under ``ome``: read without listing anything, as most web servers list no
    folder), else the members its store lists directly under it (a plate of thousands of wells is not walked); of a
    bioformats2raw collection, those of its first image (the one a run segments)."""
    series = collection_images(group)
    if series:
        image = group[series[0]]
        members, levels = _group_members(image)
        return ([(series[0], image)] + [(f"{series[0]}/{name}", node) for name, node in members],
                [f"{series[0]}/{level}" for level in levels])
    attributes = dict(group.attrs)
    multiscales = attributes.get("multiscales") or (attributes.get("ome") or {}).get("multiscales") or []
    levels = []
    for scale in multiscales if isinstance(multiscales, list) else []:
        for dataset in (scale.get("datasets") or []) if isinstance(scale, dict) else []:
            path = str(dataset.get("path", "")).strip("/") if isinstance(dataset, dict) else ""
            if path and path not in levels:
                levels.append(path)
    if levels:
        return [(path, group[path]) for path in levels], levels
    return list(group.members(max_depth=0)), []


def _sampled_chunks(address: str, array) -> tuple[list[str], list[bytes | None]]:
    """The keys of :data:`SAMPLED_CHUNKS` stored chunks (shards, where the array is sharded) spread over ``array``
    (of the store at ``address``) in C order, and their bytes as stored (None: not written, the fill value), read in
    one batch by fsspec (zarr's own file system runs on zarr's event loop only)."""
    import fsspec

    grid = tuple(-(-size // step) for size, step in zip(array.shape, array.shards or array.chunks))
    count = int(np.prod(grid, dtype=np.int64))
    picks = sorted({(count - 1) * i // (SAMPLED_CHUNKS - 1) for i in range(SAMPLED_CHUNKS)}) if count else []
    keys = [array.metadata.encode_chunk_key(tuple(int(c) for c in np.unravel_index(i, grid))) for i in picks]
    fs, root = fsspec.core.url_to_fs(address, **remote_options(address))
    prefix = "/".join(part for part in (root.rstrip("/"), array.path) if part)
    paths = [f"{prefix}/{key}" for key in keys]
    found = fs.cat(paths, on_error="return") if paths else {}
    stored = []
    for path in paths:
        value = found.get(path, FileNotFoundError(path))
        if isinstance(value, FileNotFoundError):
            stored.append(None)
        elif isinstance(value, BaseException):
            raise OSError(f"A chunk of the zarr store cannot be read ({path}): {value}") from value
        else:
            stored.append(bytes(value))
    return keys, stored
