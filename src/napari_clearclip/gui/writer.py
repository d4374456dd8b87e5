"""Saving labels from napari's File menu in the command line's format, so that they keep their classes.

napari's own writer saves the label numbers alone: opened again, a corrected result has lost which class each
number is, and the pixels the user painted look like the model's answer. This writer (File > Save Selected
Layers..., the file type "ClearCLIP labels with their classes") writes what Save labels... writes: ``<name>_labels.tif``
with a record of the classes, of the image the labels are the result of and of the pixels painted by hand, and
``<name>_classes.csv`` beside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OutputError
from .layers import FULL_SIZE_KEY, RESULT_KEY, TILED_KEY
from .reader import OPENED_KEY, painted_before


def class_names(metadata: dict, features) -> list[str] | None:
    """The class of each label (label 1 first) as a ClearCLIP result shows them (one the widget wrote, or labels of
    the command line opened in napari), or None for other labels (another plugin's "class" column is theirs)."""
    if not any(isinstance(metadata.get(key), dict) for key in (RESULT_KEY, OPENED_KEY, TILED_KEY)):
        return None
    try:
        column = list(features["class"]) if features is not None and "class" in features else None
    except (TypeError, KeyError):
        column = None
    if column and len(column) > 1:
        return [str(name) for name in column[1:]]
    opened = metadata.get(OPENED_KEY)
    if isinstance(opened, dict) and opened.get("names"):
        return [str(name) for name in opened["names"]]
    return None


def saved_parts(labels: np.ndarray, metadata: dict) -> dict:
    """What the record of ``labels`` (as shown now) keeps beside their classes: ``source`` (the image's file, or
    None), ``array`` (where in that file, a zarr store, the image lies, or None), ``sample`` (a digest of the
    image's pixels on a grid, which tells apart images a reader gives from one file, or None), ``placement`` (scale and
    translation over a reduced image, or None) and ``edited`` (the pixels painted by hand: those unlike what the runs
    wrote, and those painted with the label the run gave; or None)."""
    result = metadata.get(RESULT_KEY) if isinstance(metadata.get(RESULT_KEY), dict) else {}
    opened = metadata.get(OPENED_KEY) if isinstance(metadata.get(OPENED_KEY), dict) else {}
    record = opened.get("record") or {}
    source = result.get("source") or record.get("source") or None
    array = result.get("array") if result.get("source") else record.get("array")
    sample = result.get("image_sample") if result.get("source") else record.get("image_sample")
    full = metadata.get(FULL_SIZE_KEY)
    if isinstance(full, dict) and full.get("factors"):
        factors = [float(f) for f in full["factors"][-2:]]
        placement = {"scale": factors, "translate": [(f - 1) / 2 for f in factors]}
    else:
        placement = record.get("placement")
    baseline = result.get("baseline") if result else opened.get("baseline")
    painted = result.get("edited") if result else None
    if not result and opened:
        painted = painted_before(opened, labels.shape)
    tiled = metadata.get(TILED_KEY)
    if not result and not opened and isinstance(tiled, dict) and tiled.get("store"):   # segmented tile by tile
        from ..tiled_edits import PaintedPixels, result_record

        pixels = PaintedPixels.of(labels, tiled["store"])
        painted = None if pixels is None else pixels[...]
        kept = result_record(tiled["store"]) or {}   # its image, as the run recorded it in its store
        source, array, sample = kept.get("source") or None, kept.get("array"), kept.get("image_sample")
    edited = None
    if isinstance(baseline, np.ndarray) and baseline.shape == labels.shape:
        edited = labels != baseline
    if isinstance(painted, np.ndarray) and painted.shape == labels.shape:
        edited = painted.copy() if edited is None else edited | painted
    return {"source": source, "array": array if source else None, "sample": sample if source else None,
            "placement": placement, "edited": edited}


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """napari's writer hook for one Labels layer saved as a TIFF: a ClearCLIP result (labels with class names) in the
    command line's format (see the module), its name given the ending ``_labels.tif`` where it lacks it, as the
    command line names labels; any other labels exactly as napari's own writer writes them. An existing file is
    replaced only under the name the save dialog asked about; each file is written whole or not at all. A result larger than
    memory should hold (a slide segmented tile by tile, whose zarr store is the result) is refused with the
    reason."""
    from ..batch.files import write_labels_file
    from ..batch.labels_reading import IN_MEMORY_PIXELS

    metadata = attributes.get("metadata") or {}
    names = class_names(metadata, attributes.get("features"))
    if names is None:   # not a ClearCLIP result: napari's own writer, as without this plugin
        return _napari_own_writer(path, data, attributes)
    name = attributes.get("name", "labels")
    if not isinstance(data, np.ndarray) and int(np.prod(np.shape(data)[-2:])) > IN_MEMORY_PIXELS:
        tiled = metadata.get(TILED_KEY)
        where = f" in {tiled['store']}" if isinstance(tiled, dict) and tiled.get("store") else ""
        raise OutputError(f"{name} is held in a zarr store{where}, too large to save as one TIFF: Save labels... "
                          "in the ClearCLIP dock copies it, with its classes, into <name>_labels.zarr.")
    labels = np.asarray(data)
    parts = saved_parts(labels, metadata)
    # napari's save dialog asked about the name given: a file of another name (given the ending) is never replaced
    asked = Path(path).name.endswith("_labels.tif")
    written = write_labels_file(path, labels, names, parts["source"], overwrite=asked, placement=parts["placement"],
                                edited=parts["edited"], array=parts["array"], sample=parts["sample"])
    return [str(Path(item)) for item in written]


def _napari_own_writer(path: str, data, attributes: dict) -> list[str]:
    """Labels written by the writer napari itself declares for them (a TIFF of their numbers)."""
    import npe2

    manifest = npe2.PluginManager.instance().get_manifest("napari")
    writer = next(item for item in manifest.contributions.writers
                  if item.layer_types == ["labels"] and Path(path).suffix.lower() in item.filename_extensions)
    written = writer.exec(args=(path, data, attributes))
    return [written] if isinstance(written, str) else list(written or [])
