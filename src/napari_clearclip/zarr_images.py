"""Zarr images read lazily: plain arrays, and OME-Zarr multiscale groups (their full-resolution level).

OME-Zarr keeps channels first ((c, y, x), or (t, c, z, y, x) with length-1 axes); the engine takes
(y, x) or (y, x, channels). :class:`ChannelsLast` gives that view without reading anything: only
the rows and columns a tile asks for are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageNotFoundError, InvalidImageError


def is_zarr_path(path: Path) -> bool:
    """A folder that is a zarr store (v2 or v3 metadata inside), e.g. ``image.zarr``."""
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


def open_zarr_image(path: Path):
    """The image in a zarr store, unread: an array, or a multiscale group's first (full-resolution) level."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise ImageNotFoundError(f"No such zarr store: {path}")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InvalidImageError(f"Could not open {path} as a zarr store: {exc}") from None
    if isinstance(node, zarr.Array):
        return node
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if multiscales:
        first = multiscales[0]
        array = node[first["datasets"][0]["path"]]
        axes = [a["name"] if isinstance(a, dict) else a for a in first.get("axes", [])]
        if axes and (len(axes) != array.ndim or [a.lower() for a in axes][-2:] != ["y", "x"] or array.ndim > 2):
            return ChannelsLast(array, axes)
        return array
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        return node[arrays[0]]
    raise InvalidImageError(f"{path} is a zarr group with {len(arrays)} arrays and no OME-Zarr multiscales: "
                            "name the array's own folder.")


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
