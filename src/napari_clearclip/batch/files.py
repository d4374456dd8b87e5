"""Files in a batch: which inputs, reading them, unique output names, writing outputs and the report.

Outputs of a file are written only when it is done, each through a temporary file renamed
into place (the labels last: their presence marks a finished file), so an interrupted batch
leaves whole outputs only.
"""

from __future__ import annotations

import csv
import glob
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import ImageNotFoundError, InvalidImageError, InvalidOptionError, OutputError
from ..files import PARTIAL_SUFFIX, write_atomic
from ..image_locations import RemoteStore, image_location, is_local_file, remote_address
from ..tiff_images import TIFF_SUFFIXES, is_tiff_path, open_tiff_levels, samples_last
from ..zarr_images import is_zarr_path, open_zarr_image
from .provenance import LABELS_SUFFIXES, natural_stems, tiff_metadata


IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Label outputs: TIFF files (read whole), or zarr stores written tile by tile (large images).
OUTPUT_FORMATS = ("tif", "zarr")
REPORT_NAME = "clearclip_report.csv"
#: Where the finished planes of an unfinished stack wait (see :mod:`.runs`).
PARTS_DIR = ".clearclip-parts"


@dataclass
class FileReport:
    """What happened to one input: ``status`` is "done", "skipped" or "failed"."""

    path: Path | RemoteStore   # a store read over the network is named by its address
    status: str
    seconds: float = 0.0
    worker: str = ""
    error: str = ""     # why it failed or was skipped; for one done, a note (e.g. the level a slide was segmented at)
    outputs: list[Path] = field(default_factory=list)


# -- inputs --------------------------------------------------------------------------------------------

def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path | RemoteStore]:
    """Files as given, the images inside folders (sorted, not recursive), and glob patterns expanded; an address
    (``https://``, ``s3://`` ...) is a zarr store read over the network (:class:`RemoteStore`), read a region at
    a time as a local store is.

    A pattern that matches nothing, and a folder without images, stay in the list so
    that they are reported as failures rather than silently dropped. Labels and probabilities
    that a batch wrote (a folder that is also the output folder holds them) are not images of
    the folder or pattern; named as files, they are taken as given.
    """
    from .provenance import is_batch_output

    if isinstance(inputs, (str, bytes, os.PathLike, RemoteStore)):
        inputs = [inputs]  # one path, not the characters of its name
    paths: list[Path | RemoteStore] = []
    for item in inputs:
        if isinstance(item, bytes):
            item = os.fsdecode(item)
        if isinstance(item, RemoteStore):
            paths.append(item)
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise InvalidOptionError(f"Inputs must be paths (files, folders or glob patterns) or addresses of zarr "
                                     f"stores, not {item!r}.")
        text = os.fspath(item)
        if remote_address(text) is not None:   # (a Path would fold its "//" into a name found nowhere)
            paths.append(remote_input(text))
            continue
        path = Path(text).expanduser()
        try:
            folder = path.is_dir() and not is_zarr_path(path)
            pattern = not folder and not path.exists() and glob.has_magic(text)
        except OSError:  # a name the file system cannot hold (too long, say): that input fails alone, by its name
            paths.append(path)
            continue
        if folder:
            found = path.iterdir()
        elif pattern:
            found = (Path(p) for p in glob.glob(os.path.expanduser(text)))
        else:
            paths.append(path)
            continue
        images = sorted(p for p in found if _is_image(p) and not is_batch_output(p))
        paths.extend(images or [path])
    # one file named twice (a folder and a pattern over it, a relative and an absolute path) is one input; a link
    # of another name is an input of its own, as named
    unique: dict[str, Path | RemoteStore] = {}
    for path in paths:
        unique.setdefault(path.address if isinstance(path, RemoteStore) else os.path.abspath(path), path)
    return list(unique.values())


def input_exists(path: Path | RemoteStore) -> bool:
    """Whether an input is there to be read: a file or a local store that exists; a store at an address is taken as
    there (reading it says where it is not)."""
    return isinstance(path, RemoteStore) or path.exists()


def remote_input(address: str) -> RemoteStore:
    """An address given as an input: a zarr store (one named as another kind of file is refused, saying what to do)."""
    name = RemoteStore(address).name
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        raise InvalidOptionError(
            f"{address} is the address of a {Path(name).suffix.lstrip('.').upper()} file: addresses are read as zarr "
            "stores (OME-Zarr or plain zarr), a region at a time. Download the file and segment the copy.")
    import fsspec

    for protocol in address.split("://", 1)[0].split("::"):   # fsspec's chained forms: each part's file system
        try:
            fsspec.get_filesystem_class(protocol.lower())
        except ImportError as error:
            raise InvalidOptionError(f"{address}: reading {protocol}:// addresses needs a package this Python lacks "
                                     f"({error}).") from None
        except ValueError:
            raise InvalidOptionError(f"{address}: {protocol}:// is not a protocol fsspec can read (https://, s3://, "
                                     "gs://, ...).") from None
    return RemoteStore(address)


def _is_image(path: Path) -> bool:
    """An image file a folder or pattern stands for (by its suffix), or a zarr store."""
    return (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES) or is_zarr_path(path)


def read_image(path: Path, absent_chunks: str = "error") -> np.ndarray:
    """Read an image file; TIFFs through tifffile, other formats through scikit-image; a zarr store whole
    (one that lacks chunks is refused unless ``absent_chunks="fill"``)."""
    if isinstance(path, RemoteStore):
        return np.asarray(open_zarr_image(path, absent_chunks))
    path = Path(path)
    if is_zarr_path(path):
        return np.asarray(open_zarr_image(path, absent_chunks))
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder with no images ({', '.join(IMAGE_SUFFIXES)}, or .zarr stores).")
    if not path.is_file():
        if not path.exists() and glob.has_magic(str(path)):
            raise ImageNotFoundError(f"No image matches the pattern {path} (images: {', '.join(IMAGE_SUFFIXES)}, or .zarr "
                                     "stores; labels this command wrote are left out)")
        raise ImageNotFoundError(f"No such file: {path}")
    if path.stat().st_size == 0:
        raise InvalidImageError(f"{path} is empty (0 bytes): the file was not written completely; copy or export it again.")
    try:
        if is_tiff_path(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:   # an RGB image's samples last, however the file keeps them
                if not tif.series:                  # a damaged file: said below
                    image = np.empty((0,))
                else:
                    image = samples_last(tif.series[0].asarray(), tif.series[0].axes)
        else:
            from skimage.io import imread

            image = imread(path)
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(f"Could not read {path} as an image: {_read_failure(path, exc)}") from None
    if np.ndim(image) < 2 or np.size(image) == 0:   # a damaged TIFF reads as an empty array, without an error
        raise InvalidImageError(f"Could not read {path} as an image: it holds no pixels (shape {np.shape(image)}); "
                                "the file is damaged or was not written completely, so copy or export it again.")
    return _as_picture(path, image)


def _as_picture(path: Path, image: np.ndarray) -> np.ndarray:
    """A picture file's pixels as a run takes them: a one-frame GIF without its frame axis, grey with alpha as grey
    (RGBA keeps its alpha for the engine to drop), a bilevel (1-bit) image as 0 and 255; an animation is refused."""
    if not is_tiff_path(path):
        if image.ndim == 4 or (image.ndim == 3 and path.suffix.lower() == ".gif" and image.shape[-1] not in (3, 4)):
            if image.shape[0] != 1:
                raise InvalidImageError(f"{path} is an animation of {image.shape[0]} frames: save the frame to "
                                        "segment as an image of its own (or the frames as a multi-page TIFF).")
            image = image[0]
        if image.ndim == 3 and image.shape[-1] == 2:   # a picture's two channels are grey and alpha
            image = image[..., 0]
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * np.uint8(255)
    return image


def read_lazy(path: Path, absent_chunks: str = "error"):
    """A zarr store's or a one-plane TIFF's image unread (its tiles are read as they are segmented); other files read
    whole."""
    if is_zarr_path(path):
        return open_zarr_image(path, absent_chunks)
    levels = open_tiff_levels(path) if is_tiff_path(path) and Path(path).is_file() else None
    return levels[0] if levels else read_image(path)


def _read_failure(path: Path, exc: Exception) -> str:
    """Why a file could not be read, in terms of the file (not of the reading library's plug-ins)."""
    text = str(exc)
    if "backend" in text.lower() or "plugin" in text.lower() or "format" in text.lower():
        return (f"it is not a {path.suffix.lstrip('.').upper() or 'known'} image, or it is damaged "
                f"(supported: {', '.join(IMAGE_SUFFIXES)})")
    return text.splitlines()[0] if text else type(exc).__name__


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per input in an empty folder (see :func:`provenance.natural_stems`)."""
    return natural_stems(paths)


# -- outputs -------------------------------------------------------------------------------------------

def output_paths(out_dir: Path, stem: str, save_probabilities: bool = False, objects: bool = False,
                 output_format: str = "tif") -> list[Path]:
    """Labels (first: the mark of a finished output), class table, then probabilities and objects when asked."""
    paths = [out_dir / f"{stem}_labels.{output_format}", out_dir / f"{stem}_classes.csv"]
    if save_probabilities:
        paths.append(out_dir / f"{stem}_probabilities.tif")
    if objects:
        paths.append(out_dir / f"{stem}_objects.csv")
    return paths


#: What a file's temporary name adds to its name while it is written (:func:`..files.write_atomic`): two dots, eight
#: random characters and the partial suffix.
TEMPORARY_NAME_EXTRA = 2 + 8 + len(PARTIAL_SUFFIX)


def longest_name_allowed(folder: Path) -> int:
    """The longest file name, in bytes, the file system of ``folder`` takes (255 where it does not say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def name_too_long(paths: Sequence[Path], limit: int) -> str | None:
    """Why one of ``paths`` cannot be written where it goes (its name, with what its temporary name adds, is over
    ``limit`` bytes), or None when every one can."""
    for path in paths:
        length = len(os.fsencode(path.name)) + TEMPORARY_NAME_EXTRA
        if length > limit:
            return (f"its output {path.name[:24]}...{path.name[-20:]} would have a name of {length} bytes while it is "
                    f"written, and the output folder's file system takes at most {limit}: give the image a shorter "
                    "name")
    return None


def objects_path(image: Path, suffix: str) -> Path:
    """A TIFF that goes with an image (instance labels, a foreground map): ``<stem><suffix>.tif`` beside it."""
    return image.with_name(f"{image.stem}{suffix}.tif")


def _read_beside(image: Path, suffix: str, what: str, option: str) -> np.ndarray:
    _refuse_beside_address(image, what, option)
    path = objects_path(image, suffix)
    if not path.is_file():
        raise ImageNotFoundError(f"No {what} {path.name} beside {image.name} ({option} {suffix}).")
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as exc:
        raise InvalidImageError(f"Could not read the {what} {path}: {exc}") from None


def _refuse_beside_address(image, what: str, option: str) -> None:
    if isinstance(image, RemoteStore):
        raise InvalidOptionError(f"{option} reads files beside the image on this computer, and {image} is an address: "
                                 f"copy the store and its {what} here and segment the copy.")


def read_foreground(image: Path, suffix: str) -> np.ndarray:
    """The foreground map beside an image (``<stem><suffix>.tif``): probabilities in 0..1, or a mask."""
    return _read_beside(image, suffix, "foreground map", "--foreground")


def read_objects(image: Path, suffix: str) -> np.ndarray:
    """The instance labels beside an image (``<stem><suffix>.tif``)."""
    return _read_beside(image, suffix, "objects file", "--objects")


def read_lazy_objects(image: Path, suffix: str, absent_chunks: str = "error"):
    """The instance labels beside an image for a run tile by tile, unread (a tile is read at a time):
    ``<stem><suffix>.zarr`` (a zarr array or OME-Zarr image), else ``<stem><suffix>.tif`` (through its own tiles
    or strips)."""
    _refuse_beside_address(image, "objects", "--objects")
    store = image.with_name(f"{image.stem}{suffix}.zarr")
    if store.is_dir():
        return open_zarr_image(store, absent_chunks)
    path = objects_path(image, suffix)
    if not path.is_file():
        raise ImageNotFoundError(f"No objects file {path.name} or {store.name} beside {image.name} "
                                 f"(--objects {suffix}).")
    import tifffile
    import zarr

    try:
        return zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except Exception as exc:
        raise InvalidImageError(f"Could not read the objects file {path}: {exc}") from None


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create the output folder if needed and prove it writable, before any computing."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file, not a folder: name a folder for the results.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".clearclip-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"Cannot write to the output folder {path}: {exc.strerror or exc}.") from None
    return path


def write_outputs(result, out_dir: Path, stem: str, save_probabilities: bool = False,
                  record: dict | None = None, calibration=None) -> list[Path]:
    """``<stem>_labels.tif`` (uint16, with the run's record), ``<stem>_classes.csv``, and optionally the
    probabilities and (with objects) ``<stem>_objects.csv``; the TIFFs with the image's pixel size
    (``calibration``, :func:`.calibration.tiff_calibration`)."""
    import tifffile

    placed = calibration.tiff_options(result.labels.shape) if calibration is not None else {}

    labels_path, table_path, *extra = output_paths(out_dir, stem, save_probabilities, result.objects is not None)
    prob_path = extra[:1] if save_probabilities else []
    if result.objects is not None:
        write_atomic(extra[-1], lambda p: _write_objects_table(p, result.objects))
    dtype = np.uint16 if len(result.class_names) < 65535 else np.uint32

    # the labels go last: their presence marks a finished file for resumed runs
    if prob_path:
        write_atomic(prob_path[0], lambda p: tifffile.imwrite(p, result.probabilities, photometric="minisblack",
                                                                   compression="zlib", **placed))
    write_atomic(table_path, lambda p: _write_class_table(p, result.class_table()))
    write_atomic(labels_path, lambda p: _write_labels(p, result.labels.astype(dtype), record, calibration))
    return [labels_path, table_path, *extra]


def labels_file_path(path) -> Path:
    """``path`` named as the command line names labels (``<name>_labels.tif``), so that they open again with their
    classes: "cells.tif" and "cells" become "cells_labels.tif"."""
    path = Path(path).expanduser()
    if path.name.endswith("_labels.tif"):
        return path
    stem = path.name[: -len(path.suffix)] if path.suffix.lower() in (".tif", ".tiff") else path.name
    return path.with_name(f"{stem}_labels.tif")


def write_labels_file(path, labels: np.ndarray, names: list[str], source=None, overwrite: bool = False,
                      placement: dict | None = None, edited: np.ndarray | None = None,
                      array: str | None = None, sample: str | None = None) -> list[Path]:
    """Labels (a result corrected by hand, say) in the command line's format: ``<name>_labels.tif`` with a record of
    their classes and of the image file they label (``source``, when there is one), and ``<name>_classes.csv``
    beside, each written atomically. They open in napari with their classes, as that image's result, and a run of
    the command line keeps them as outputs. An existing file is refused unless ``overwrite`` (a save dialog asked).
    ``placement``: for labels of an image segmented at a reduced size, their ``scale`` and ``translate`` in the
    image's pixels (along the plane's axes). ``edited``: the pixels the user painted, kept in the record so that,
    opened again, they stay the user's (kept and taught) rather than taken for the model's answer. ``array``: where
    in its zarr store the image lies (``"0"``), which tells it from the store's other images, that share its
    location. ``sample``: a digest of the image's pixels on a grid (:func:`~napari_clearclip.tiled_edits.pixels_sample`),
    which tells the image from others a reader gives from the same file (a CZI's scenes)."""
    import tifffile

    from ..prompts import ClassQuery
    from ..results import class_rows

    path = labels_file_path(path)
    table = path.with_name(path.name[: -len("_labels.tif")] + "_classes.csv")
    if not overwrite and (path.exists() or table.exists()):
        raise OutputError(f"{path.name if path.exists() else table.name} exists in {path.parent}: choose another "
                          "name (it is never overwritten unasked).")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "ui" or (labels.size and labels.min() < 0):
        raise InvalidImageError(f"labels of type {labels.dtype} with negative values cannot be saved as labels.")
    record = _saved_record(names, source, placement, array, sample)
    if edited is not None and np.shape(edited) == labels.shape and np.any(edited):
        from .labels_reading import encode_edits

        record["edited"] = encode_edits(edited)
    counts = np.bincount(labels.ravel(), minlength=len(names) + 1) if labels.size else np.zeros(len(names) + 1, int)
    rows = class_rows([ClassQuery(name, (name,)) for name in names], counts)
    dtype = np.uint16 if max(len(names), int(labels.max(initial=0))) < 65535 else np.uint32
    write_atomic(table, lambda p: _write_class_table(p, rows))
    write_atomic(path, lambda p: tifffile.imwrite(p, labels.astype(dtype, copy=False), photometric="minisblack",
                                                  compression="zlib", metadata=tiff_metadata(record)))
    return [path, table]


def _saved_record(names: Sequence[str], source=None, placement: dict | None = None, array: str | None = None,
                  sample: str | None = None) -> dict:
    """The record of labels saved from napari: their classes, the image file they label (with its size and the
    digest of blocks spread over it, to know a copy of it, or where in its zarr store the image lies) and, for labels
    of an image segmented at a reduced size, their place over it."""
    record = {"source": "", "classes": list(names), "run": "napari"}
    if placement is not None:
        record["placement"] = {"scale": [float(v) for v in placement["scale"]],
                               "translate": [float(v) for v in placement["translate"]]}
    if source:
        record["source"] = image_location(source)   # a remote store's address as it is
        if array is not None:
            record["array"] = str(array)
        if sample is not None:
            record["image_sample"] = str(sample)
        image = Path(record["source"])
        if is_local_file(source) and image.is_file():
            from ..hashing import sampled_digest

            record["size"], record["sample"] = image.stat().st_size, sampled_digest(image)
    return record


def labels_store_path(path) -> Path:
    """``path`` named as the command line names labels written tile by tile (``<name>_labels.zarr``): "slide.zarr"
    and "slide" become "slide_labels.zarr"."""
    path = Path(path).expanduser()
    if path.name.endswith("_labels.zarr"):
        return path
    stem = path.name[: -len(".zarr")] if path.name.lower().endswith(".zarr") else path.name
    return path.with_name(f"{stem}_labels.zarr")


#: Rows of a labels store copied at a time when it is saved: a band of a 20000-pixel-wide slide is 80 MB of uint16.
SAVED_BAND_ROWS = 2048


def write_labels_store_steps(path, labels, names: Sequence[str], source=None, band_rows: int = SAVED_BAND_ROWS,
                             painted=None, array: str | None = None, sample: str | None = None):
    """Generator: labels too large to hold (a slide segmented tile by tile, read from its zarr store) in the command
    line's format for such labels: ``<name>_labels.zarr`` with the record of their classes and image in its
    attributes, and ``<name>_classes.csv`` beside. ``painted``: the pixels painted by hand (a boolean array-like of
    the labels' shape, read a band at a time, see :class:`~napari_clearclip.tiled_edits.PaintedPixels`), kept as the
    store's ``edited`` array so that they stay the user's when the labels are opened again (none: no such array).
    ``array`` and ``sample``: where in its zarr store the image lies, and a digest of its pixels on a grid, as
    :func:`write_labels_file` records them. Copied a band of
    rows at a time (yields (bands done, bands)), into ``<name>_labels.zarr.partial`` put in place when whole, the
    class table written before it: an interrupted save leaves no store that reads as labels. An existing store or
    table is refused. Returns [store, table]."""
    import json

    import zarr

    from ..prompts import ClassQuery
    from ..results import class_rows
    from .provenance import RECORD_KEY

    store = labels_store_path(path)
    table = store.with_name(store.name[: -len("_labels.zarr")] + "_classes.csv")
    if store.exists() or table.exists():
        raise OutputError(f"{store.name if store.exists() else table.name} exists in {store.parent}: choose another "
                          "name (it is never overwritten unasked).")
    height, width = (int(n) for n in labels.shape[-2:])
    if len(labels.shape) != 2 or np.dtype(labels.dtype).kind not in "ui":
        raise InvalidImageError(f"labels of shape {tuple(labels.shape)} and type {labels.dtype} cannot be saved as a "
                                "labels store (2-D integer labels only).")
    dtype = np.uint16 if len(names) < 65535 else np.uint32
    chunks = tuple(int(c) for c in getattr(labels, "chunks", None) or (1024, 1024))[-2:]
    attrs = {RECORD_KEY: json.dumps(_saved_record(names, source, array=array, sample=sample), sort_keys=True)}
    if source and is_local_file(source):
        from .calibration import labels_zarr_attrs

        attrs.update(labels_zarr_attrs(Path(source), (height, width)))
    partial = store.with_name(store.name + ".partial")
    if partial.exists():   # an earlier save cut short
        shutil.rmtree(partial)
    bands = max(1, -(-height // band_rows))
    counts = np.zeros(len(names) + 1, np.int64)
    try:
        group = zarr.open_group(str(partial), mode="w")
        group.attrs.update(attrs)
        store_chunks = (min(chunks[0], height), min(chunks[1], width))
        out = group.create_array("labels", shape=(height, width), dtype=dtype, fill_value=0, chunks=store_chunks)
        edited = None
        for band in range(bands):
            rows = slice(band * band_rows, min(height, (band + 1) * band_rows))
            values = np.asarray(labels[rows])
            if values.size and values.min() < 0:
                raise InvalidImageError("labels with negative values cannot be saved as labels.")
            counts += np.bincount(values.ravel(), minlength=len(counts))[: len(counts)]
            out[rows] = values.astype(dtype, copy=False)
            mask = None if painted is None else np.asarray(painted[rows], dtype=bool)
            if mask is not None and mask.any():
                if edited is None:   # made at the first painted band: labels nobody painted get no such array
                    edited = group.create_array("edited", shape=(height, width), dtype=bool, fill_value=False,
                                                chunks=store_chunks)
                edited[rows] = mask
            yield band + 1, bands
        rows_of_table = class_rows([ClassQuery(name, (name,)) for name in names], counts)
        write_atomic(table, lambda p: _write_class_table(p, rows_of_table))
        os.replace(partial, store)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return [store, table]


def _write_objects_table(path: Path, objects: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "class", "confidence", "area"])
        for row in zip(objects["id"], objects["class"], objects["confidence"], objects["area"]):
            writer.writerow([int(row[0]), row[1], f"{float(row[2]):.4f}", int(row[3])])


def _write_class_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "name", "synonyms", "pixels"])
        writer.writeheader()
        writer.writerows(rows)


def _write_labels(path: Path, labels: np.ndarray, record: dict | None, calibration=None) -> None:
    import tifffile

    tifffile.imwrite(path, labels, photometric="minisblack", compression="zlib",
                     metadata=tiff_metadata(record) if record else {},
                     **(calibration.tiff_options(labels.shape) if calibration is not None else {}))


REPORT_COLUMNS = ["file", "status", "seconds", "worker", "error", "labels"]


def write_report(reports: Sequence[FileReport], path: Path) -> Path:
    """A CSV with one row per input: file, status, seconds, worker, error, labels file.

    The report is the output folder's: rows of earlier runs stay, a file run again gets its
    new row, and a file skipped now keeps the row of the run that made its outputs (with its
    timings), so a resumed batch's report still says how long each image took.
    """
    rows: dict[str, dict] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("file"):
                    rows[row["file"]] = {column: row.get(column) or "" for column in REPORT_COLUMNS}
    except (OSError, ValueError, csv.Error):
        rows = {}  # no report yet, or not ours: start it anew
    for r in reports:
        key = str(r.path)
        if r.status == "skipped" and rows.get(key, {}).get("status") == "done":
            continue
        labels = next((str(o) for o in r.outputs if str(o).endswith(LABELS_SUFFIXES)), "")
        rows[key] = {"file": key, "status": r.status, "seconds": f"{r.seconds:.2f}", "worker": r.worker,
                     "error": r.error, "labels": labels}

    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows.values())

    write_atomic(path, write)
    return path


def stack_planes(path: Path) -> tuple[tuple[int, ...], bool] | None:
    """(plane shape, rgb) of a multi-plane TIFF, read from its header alone; None for a 2-D image or non-TIFF."""
    if not is_tiff_path(path) or not Path(path).is_file():
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape, axes = tuple(tif.series[0].shape), str(tif.series[0].axes)
    except Exception:
        return None  # unreadable: the image task reports it
    if "S" in axes and len(axes) == len(shape):   # an RGB image's samples, wherever the file keeps them
        rgb = shape[axes.index("S")] in (3, 4)
        shape = tuple(n for a, n in zip(axes, shape) if a != "S") + ((shape[axes.index("S")],) if rgb else ())
    else:
        rgb = len(shape) >= 3 and shape[-1] in (3, 4)
    leading = shape[: len(shape) - (3 if rgb else 2)]
    if not leading or int(np.prod(leading)) <= 1:
        return None
    return leading, rgb


def read_plane(path: Path, index: int, count: int) -> np.ndarray:
    """Plane ``index`` (flat) of a multi-plane TIFF, reading its page alone where the file allows."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.pages) == count:
                page = series.pages[index]
                return samples_last(page.asarray(), page.axes)
            data = samples_last(series.asarray(), series.axes)
    except Exception as exc:
        raise InvalidImageError(f"Could not read plane {index} of {path}: {exc}") from None
    tail = 3 if data.ndim >= 3 and data.shape[-1] in (3, 4) else 2
    return data.reshape(count, *data.shape[-tail:])[index]


def _partial_files(folder: Path, recursive: bool):
    """The temporary files ``write_atomic`` names (``.<name>.<random>.partial``) in ``folder`` (and below it); a
    folder that goes while it is read is skipped."""
    for root, _, files in os.walk(folder, onerror=lambda error: None):
        for name in files:
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                yield Path(root) / name
        if not recursive:
            break


def remove_stale_partials(out_dir: Path) -> None:
    """Temporary files of writes that a killed process never finished (named by ``write_atomic``): beside the outputs
    and in the stacks' parts. Nothing else in the output folder is looked through: zarr stores of labels, or a cache
    that other processes write into meanwhile (whose folders may go while they are read)."""
    stale = [*_partial_files(out_dir, recursive=False), *_partial_files(out_dir / PARTS_DIR, recursive=True)]
    for path in stale:
        try:
            path.unlink()
        except OSError:
            pass


