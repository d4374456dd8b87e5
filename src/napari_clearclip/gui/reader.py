"""Opening in napari the labels ``clearclip-segment`` wrote: a Labels layer with their class names and colours."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..batch.labels_reading import is_labels_output, read_labels_output

#: Where a Labels layer opened from a labels file keeps what it was made from (in its metadata).
OPENED_KEY = "napari-clearclip labels file"


def image_file_of(layer) -> str | None:
    """The file (or zarr store) an image layer shows: the one napari opened it from (a local path, or the address of
    a remote store, as napari-ome-zarr opens one), else the zarr store, local or remote, of the array given to napari
    (in its console, or by a script), so that its results are found as those of a file opened in napari; None for an
    image of no file."""
    from ..zarr_images import store_location

    source = getattr(getattr(layer, "source", None), "path", None)
    if source:
        return str(source)
    return store_location(_shown_array(layer))


def _shown_array(layer):
    """The array an image layer shows (a pyramid's full level), or None."""
    data = getattr(layer, "data", None)
    if getattr(layer, "multiscale", False):
        data = data[0] if len(data) else None
    return data


def image_array_of(layer) -> str | None:
    """Where in its zarr store the array an image layer shows lies (:func:`~napari_clearclip.zarr_images.array_path`),
    or None: with :func:`image_file_of`, it tells apart two images of one store, which share its location."""
    from ..zarr_images import array_path

    data = _shown_array(layer)
    found = array_path(data)
    if found is None and isinstance(data, np.ndarray) and _first_series_read_by_napari(layer):
        return "series 0"
    return found


def image_sample_of(layer) -> str | None:
    """A digest of the pixels an image layer holds in memory, on a grid (:func:`~napari_clearclip.tiled_edits.
    pixels_sample`), or None for a lazy image: it tells apart images a reader plugin gives from one file (a CZI's
    scenes), which share the file as their location."""
    from ..tiled_edits import pixels_sample

    return pixels_sample(_shown_array(layer))


#: The names napari's own reader goes by in a layer's source (which reads a TIFF's first series whole).
NAPARI_READERS = ("napari", "builtins", "napari_builtins")


def _first_series_read_by_napari(layer) -> bool:
    """Whether napari's own reader opened the layer from a TIFF of several series (a multi-position OME-TIFF): it
    reads the first, as the command line does, which labels of the file's other series must not be taken for."""
    from ..tiff_images import is_tiff_path

    source = getattr(layer, "source", None)
    path = getattr(source, "path", None)
    if getattr(source, "reader_plugin", None) not in NAPARI_READERS or not is_tiff_path(path):
        return False
    try:
        stat = Path(path).stat()
    except OSError:
        return False
    return _series_count(str(path), stat.st_mtime_ns, stat.st_size) > 1


@functools.lru_cache(maxsize=64)
def _series_count(path: str, mtime_ns: int, size: int) -> int:
    """How many series a TIFF file holds, as it is now (its time and size key it): read once, not on every look."""
    from ..tiff_images import series_count

    return series_count(Path(path))


def record_verdict(record: dict, layer, pixels: bool = True, siblings: bool = False) -> str:
    """Whether a labels or result record, whose image file is the layer's, is of the layer's own image: "yes", "no"
    (another image of the file), or "unknown" (it could be another's: rather than guess, it is then nobody's result,
    never updated by a run on either image nor teaching it).

    - Where the record keeps a sample of its image's pixels and the layer holds its pixels in memory, they must agree
      (:func:`image_sample_of`): a reader plugin may give several images from one file, known by nothing else
      (unless ``pixels`` is False: the file was written since, and the record is of what it held before).
    - The same array of a zarr store, or series of a TIFF (:func:`image_array_of`), where both are known. A record of
      no place in a store (labels saved by earlier versions) is known only where the store holds no other image of
      its shape; such a record of a TIFF is of its first series, the one the command line and napari's own reader
      read.
    - ``siblings``: the viewer shows other images of the file of this one's size and place, with other pixels or
      read lazily (:func:`has_sibling_images`): a record is then this image's only where its sample agrees."""
    from ..zarr_images import store_has_image_alike

    sample = record.get("image_sample")
    own = image_sample_of(layer) if isinstance(sample, str) else None
    if pixels and own is not None and own != sample:
        return "no"
    recorded, shown = record.get("array"), image_array_of(layer)
    if shown is not None and recorded is not None:
        return "yes" if recorded == shown else "no"
    if shown is not None and shown.startswith("series "):   # the command line, and napari, read a TIFF's first
        return "yes" if shown == "series 0" else "no"
    if shown is not None and store_has_image_alike(_shown_array(layer)) is not False:
        return "unknown"
    return "unknown" if siblings and (own is None or own != sample) else "yes"


def record_of_image(record: dict, layer, pixels: bool = True, siblings: bool = False) -> bool:
    """Whether a record whose image file is the layer's is known to be of the layer's own image
    (:func:`record_verdict`)."""
    return record_verdict(record, layer, pixels, siblings) == "yes"


def has_sibling_images(viewer, layer) -> bool:
    """Whether the viewer shows other image layers of the same file as ``layer``, of its size and at its place in
    the file (none known), whose pixels differ from its or are read lazily: the scenes a reader plugin gives from one
    file. A record of that file is then this image's only where a sample of its pixels says so."""
    from napari.layers import Image

    source = image_file_of(layer)
    if not source or image_array_of(layer) is not None:
        return False
    shape, own = np.shape(_shown_array(layer)), image_sample_of(layer)
    for item in viewer.layers:
        if (item is layer or not isinstance(item, Image) or np.shape(_shown_array(item)) != shape
                or image_file_of(item) != source or image_array_of(item) is not None):
            continue
        if own is None or image_sample_of(item) != own:
            return True
    return False


def unplaced_labels_note(viewer, layer, shape) -> str:
    """What a run on an image layer says of labels opened for its file and of its shape that it did not use because
    they cannot be told to be of this image of the file (:func:`record_verdict`): "" when there are none."""
    from napari.layers import Labels

    from ..tiled_edits import same_image_file

    source = image_file_of(layer)
    if not source:
        return ""
    siblings, names = has_sibling_images(viewer, layer), []
    for item in viewer.layers:
        opened = item.metadata.get(OPENED_KEY) if isinstance(item, Labels) else None
        record = (opened.get("record") or {}) if isinstance(opened, dict) else {}
        if (record and tuple(item.data.shape) == tuple(shape) and same_image_file(record, source)
                and record_verdict(record, layer, siblings=siblings) == "unknown"):
            names.append(f"'{item.name}'")
    if not names:
        return ""
    plural = len(names) > 1
    verb, subject, label, them = ("do", "they", "label", "them") if plural else ("does", "it", "labels", "it")
    return (f" {', '.join(names)} {verb} not tell which image of {Path(source).name or source} {subject} {label}, "
            "and that file holds other images of this size, or may (labels saved by an earlier version record "
            "none; images read lazily are not sampled; remote stores and stores too large are not looked "
            f"through): this run left {them} as saved and learned nothing from {them}.")


def painted_before(opened: dict, shape) -> np.ndarray | None:
    """The pixels painted by hand before labels opened from a file were saved (``opened``: what the reader keeps in
    the layer's metadata), as a mask of ``shape``, or None."""
    edited = opened.get("edited")
    if isinstance(edited, np.ndarray):
        return edited if edited.shape == tuple(shape) else None
    from ..batch.labels_reading import decode_edits

    return decode_edits(opened.get("record") or {}, tuple(shape))


def resumed_text(name: str, earlier: dict, edits) -> str:
    """What the user is told when labels open with the strokes painted on them before and not saved."""
    when = earlier.get("changed")
    return (f"{name}: the corrections painted on it{' until ' + when if when else ''} and not saved are back. They "
            f"are kept in {edits} until saved with Save labels...; to open the labels as saved, close this layer and "
            "remove that folder first.")


def get_reader(path):
    """napari's reader hook: labels written by clearclip-segment (``<name>_labels.tif`` or ``_labels.zarr`` with
    the run's record), else None so that napari's own readers open the file."""
    if isinstance(path, (list, tuple)):
        return read_labels_layers if path and all(is_labels_output(item) for item in path) else None
    return read_labels_layers if is_labels_output(path) else None


def read_labels_layers(path) -> list[tuple]:
    """One Labels layer per file: the class of each label in its features (shown as the mouse moves over it),
    class colours by name as the widget gives them (background transparent), and scaled to cover its image where
    the image was segmented at a reduced size."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..colours import colormap_dict
    from .layers import labels_features

    from ..editable_copy import EditableCopy

    layers = []
    for item in path if isinstance(path, (list, tuple)) else [path]:
        labels = read_labels_output(item)
        name = Path(item).name
        name = name[: -len(".zarr")] if name.endswith(".zarr") else Path(name).stem
        # the labels as read: what a run on their image tells the user's corrections from, and the pixels painted
        # before they were saved, which stay the user's (in memory only)
        metadata = {OPENED_KEY: {"file": str(Path(item).resolve()), "record": labels.record, "names": labels.names,
                                 "baseline": labels.data.copy() if labels.in_memory else None,
                                 "edited": labels.edited if labels.in_memory else None}}
        data = labels.data
        if not labels.in_memory and len(labels.data.shape) == 2:   # too large to hold: painted in a working copy
            data, earlier = EditableCopy.open(labels.data, item, name=Path(item).name, painted_before=labels.edited)
            if earlier is not None:
                from napari.utils.notifications import show_info

                show_info(resumed_text(Path(item).name, earlier, data.edits_path))
            metadata[OPENED_KEY]["edits"] = str(data.edits_path)
        layers.append((data, {"name": name, "features": labels_features(labels.names),
                                     "colormap": DirectLabelColormap(color_dict=colormap_dict(labels.names)),
                                     "scale": labels.scale, "translate": labels.translate,
                                     "metadata": metadata}, "labels"))
    return layers
