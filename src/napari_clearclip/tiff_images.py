"""TIFF images as runs take them: samples (RGB) last, and large ones read lazily, a region at a time.

A TIFF keeps an RGB image's samples either interleaved, (y, x, 3), or in separate planes, (3, y, x): tifffile
names that axis "S". Either way a run sees (y, x, 3); only the other leading axes (z, time, channels) make a
stack. A whole-slide image (OME-TIFF, SVS and other pyramids, or one large tiled or striped image) is opened
through tifffile's zarr store, so that a run at a pyramid level, or tile by tile, reads only what it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: TIFF files, and the whole-slide formats built on TIFF that tifffile reads (Aperio, Hamamatsu, Leica, PerkinElmer)
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".qptiff")


def is_tiff_path(path) -> bool:
    """Named as a TIFF file (a store at an address is a zarr store, whatever its name)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() in TIFF_SUFFIXES


def tiff_axes(path: Path) -> tuple[str, tuple[int, ...]] | None:
    """The axes (tifffile's letters, e.g. "YXS", "SYX", "ZYX") and shape of a TIFF's first image, from its header;
    None where it cannot be read."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return str(series.axes), tuple(int(n) for n in series.shape)
    except Exception:
        return None


def series_count(path: Path) -> int:
    """How many series (images) a TIFF holds: a multi-position acquisition's positions, say, of which a run reads
    the first; 1 where it cannot be read."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return max(1, len(tif.series))
    except Exception:
        return 1


def series_note(path: Path) -> str:
    """What a run says of a TIFF of several series, of which it segments the first; "" for any other file."""
    count = series_count(path)
    if count < 2:
        return ""
    return (f"a TIFF of {count} series: its first was segmented, and this command segments no other (open another "
            "in napari through tifffile's zarr view, series=n, as the Large images page shows)")


def samples_last(data: np.ndarray, axes: str) -> np.ndarray:
    """``data`` with its samples axis ("S", an RGB image's colours) moved last, where it is elsewhere."""
    if "S" in axes and len(axes) == data.ndim and axes.index("S") != data.ndim - 1:
        return np.moveaxis(data, axes.index("S"), -1)
    return data


def open_tiff_levels(path: Path) -> list | None:
    """The image of a one-plane TIFF, unread, at every resolution it holds (a pyramid's levels, finest first),
    each a (y, x) or (y, x, samples) view read a region at a time; None for a stack (z, time or channel planes),
    or a file tifffile cannot open so."""
    import tifffile
    import zarr

    from .zarr_images import ChannelsLast

    found = tiff_axes(path)
    if found is None:
        return None
    axes, shape = found
    if "Y" not in axes or "X" not in axes or any(n > 1 for a, n in zip(axes, shape) if a not in "YXS"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            count = len(tif.series[0].levels)
        node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        arrays = [node] if isinstance(node, zarr.Array) else [node[str(level)] for level in range(count)]
    except Exception:
        return None
    names = ["c" if a == "S" else a.lower() for a in axes]
    if axes in ("YX", "YXS"):
        return arrays
    return [ChannelsLast(array, names) for array in arrays]
