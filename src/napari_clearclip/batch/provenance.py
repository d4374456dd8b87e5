"""Which input, and which run, an output file belongs to.

A labels file written by a batch carries a small record in its TIFF description: the
input's absolute path and content hash, and a fingerprint of the run (classes, model,
weights, method, options, package version). A later run reads the records to know
which existing outputs are whose, so that an output is skipped only for the input it
was made from, and an interrupted stack resumes only from parts of the very same run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import StoreUnreachableError
from ..image_locations import RemoteStore

RECORD_KEY = "clearclip"
LABELS_SUFFIXES = ("_labels.tif", "_labels.zarr")


def _plain(value):
    """Options as JSON-able values in a fixed form (tuples as lists, numpy numbers as Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def run_fingerprint(model: str, pretrained: str | None, method: str, precision: str, classes: Sequence[str],
                    options: dict) -> str:
    """A short hash of everything that decides the labels of a run (a local weights file by its content)."""
    from .. import __version__
    from ..cache import file_digest

    weights = pretrained
    if weights and os.path.isfile(weights):
        weights = "sha256:" + file_digest(weights)
    text = json.dumps({"model": model, "weights": weights, "method": method, "precision": precision,
                       "classes": list(classes), "options": _plain(options), "version": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def source_identity(path: Path) -> dict:
    """The input as a record holds it: absolute path, size, modification time and content hash (and the digest of
    blocks spread over it that tells a copy elsewhere from another file of its name and size, cheaply)."""
    from ..cache import file_digest
    from ..hashing import sampled_digest

    if isinstance(path, RemoteStore):   # told by its metadata and a few chunks' bytes: no time, no listing
        from ..zarr_images import no_store_at, remote_store_identity

        try:
            return {"source": path.address, **remote_store_identity(path.address), **_array_in(path)}
        except FileNotFoundError:
            raise no_store_at(path.address) from None
        except OSError as error:   # unreadable for now: that input fails, said as such
            raise StoreUnreachableError(str(error)) from None
    if path.is_dir():  # a zarr store
        from ..zarr_images import store_identity

        return {"source": str(path.resolve()), **store_identity(path), **_array_in(path)}
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_digest(path), "sample": sampled_digest(path), **_series_in(path)}


def _series_in(path: Path) -> dict:
    """Which series of a TIFF of several the run segments (its first: ``{"array": "series 0"}``), which tells it
    apart from the file's other series, read lazily in napari (see
    :func:`~napari_clearclip.zarr_images.array_path`); {} for any other file."""
    from ..tiff_images import is_tiff_path, series_count

    return {"array": "series 0"} if is_tiff_path(path) and series_count(path) > 1 else {}


def _array_in(store) -> dict:
    """Where in a zarr store the image a run segments lies (``{"array": "0/0"}``: a collection's first image), which
    tells it apart from the store's other images, that share its location; {} where the store cannot say."""
    from ..errors import ClearClipError
    from ..zarr_images import array_path, open_zarr_levels

    try:
        array = array_path(open_zarr_levels(store)[0])
    except ClearClipError:   # said where the image is read
        return {}
    return {} if array is None else {"array": array}


def make_record(path: Path, run: str, classes: Sequence[str]) -> dict:
    return {**source_identity(path), "run": run, "classes": list(classes)}


def tiff_metadata(record: dict) -> dict:
    """What ``tifffile.imwrite(metadata=...)`` stores in the labels file's description."""
    return {RECORD_KEY: json.dumps(record, sort_keys=True)}


def read_record(labels_path: Path) -> dict | None:
    """The record in a labels file, or None (written elsewhere, saved again by another program, unreadable)."""
    if Path(labels_path).is_dir():  # a zarr store: the record is in its attributes
        try:
            import zarr

            text = zarr.open_group(str(labels_path), mode="r").attrs.get(RECORD_KEY)
            record = json.loads(text) if isinstance(text, str) else None
        except Exception:
            return None
        return record if isinstance(record, dict) and isinstance(record.get("source"), str) else None
    try:
        import tifffile

        with tifffile.TiffFile(labels_path) as tif:
            shaped = tif.shaped_metadata
            text = shaped[0].get(RECORD_KEY) if shaped else None
        record = json.loads(text) if isinstance(text, str) else None
    except Exception:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("source"), str) else None


def is_batch_output(path: Path) -> bool:
    """Whether ``path`` is labels (or probabilities) a batch wrote, by its name and the record in it (or in the labels
    beside it), or the class table a batch wrote beside it (labels corrected and saved over by another program, such
    as napari, which keeps no record): a folder that is also the output folder holds them, and they are not images
    to segment."""
    name = path.name
    if name.endswith(LABELS_SUFFIXES):
        return read_record(path) is not None or class_table_names(path) is not None
    if name.endswith("_probabilities.tif"):
        stem = name[: -len("_probabilities.tif")]
        return any(is_batch_output(path.with_name(stem + suffix)) for suffix in LABELS_SUFFIXES
                   if path.with_name(stem + suffix).exists())
    return False


def class_table_names(path: Path) -> list[str] | None:
    """The class names of labels 1, 2, ... from the ``<name>_classes.csv`` the run wrote beside ``path``, or None."""
    import csv

    stem = next((path.name[: -len(suffix)] for suffix in LABELS_SUFFIXES if path.name.endswith(suffix)), None)
    if stem is None:
        return None
    table = path.with_name(f"{stem}_classes.csv")
    try:
        with open(table, newline="", encoding="utf-8") as handle:
            rows = {int(row["label"]): str(row["name"]) for row in csv.DictReader(handle)}
    except (OSError, KeyError, ValueError, TypeError, csv.Error):
        return None
    count = max(rows, default=0)
    if count < 1 or any(label not in rows for label in range(1, count + 1)):
        return None
    return [rows[label] for label in range(1, count + 1)]


@dataclass
class ExistingOutput:
    """A finished output in the folder: its stem, and its record (None when it has none)."""

    stem: str
    record: dict | None


def finished_labels(out_dir: Path, stem: str) -> Path | None:
    """The labels an earlier run finished for ``stem``, in either format (labels are written last), else None.

    A run in the other format writes the same class table, so it too must leave an input with such labels alone
    unless asked to overwrite: it would replace the table that describes them."""
    for suffix in LABELS_SUFFIXES:
        path = out_dir / f"{stem}{suffix}"
        if path.exists():
            return path
    return None


def existing_outputs(out_dir: Path) -> dict[str, ExistingOutput]:
    """Every ``<stem>_labels.tif`` (or ``.zarr``) in the folder, by stem (the labels are written last: they mark a
    finished output)."""
    found = {}
    if not out_dir.is_dir():
        return found
    for suffix in LABELS_SUFFIXES:
        for path in sorted(out_dir.glob(f"*{suffix}")):
            if path.name.startswith(".") or not (path.is_file() or path.is_dir()):
                continue
            stem = path.name[: -len(suffix)]
            found.setdefault(stem, ExistingOutput(stem, read_record(path)))
    return found


def same_content(record: dict, path: Path) -> bool:
    """Whether ``path`` holds what the record's input held (cheap when size and time are unchanged)."""
    if isinstance(path, RemoteStore):
        from ..zarr_images import remote_store_identity

        try:
            return record.get("chunks") == remote_store_identity(path.address)["chunks"]
        except OSError:
            return False
    try:
        stat = path.stat()
    except OSError:
        return False
    if path.is_dir():
        from ..zarr_images import store_identity

        return record.get("sha256") == store_identity(path)["sha256"]
    if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    if record.get("size") != stat.st_size:
        return False
    from ..cache import file_digest

    return record.get("sha256") == file_digest(path)


def natural_stem(path: Path | RemoteStore) -> str:
    """The name an input's outputs take: its file name without its suffix; an image inside a zarr store named by a
    number (a collection's ``scan.zarr/1``, an array ``slide.zarr/0``) takes the store's name too (``scan_1``)."""
    stem = path.stem
    if stem.isdigit():
        if isinstance(path, RemoteStore):
            parent = path.address.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 2)[-2]
        else:
            parent = path.parent.name
        if parent.lower().endswith(".zarr"):
            return f"{Path(parent).stem}_{stem}"
    return stem


def natural_stems(paths: Sequence[Path], fixed: dict[int, str] | None = None,
                  reserved: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """One output name per input, unique even when inputs share a name or collide with a suffixed one.

    ``fixed`` inputs keep the names given; names in ``reserved`` (outputs of other inputs
    already in the folder) are never handed out. Other inputs keep their file name when it
    is free; repeats get ``_2``, ``_3`` ..., skipping any name another input has, so
    ``a/x.png b/x.png x_2.png`` gives x, x_3, x_2.
    """
    fixed = dict(fixed or {})
    natural = [natural_stem(p) for p in paths]
    taken = set(natural) | set(reserved) | set(fixed.values())
    assigned = set(reserved) | set(fixed.values())
    stems = []
    for index, stem in enumerate(natural):
        if index in fixed:
            stems.append(fixed[index])
            continue
        if stem not in assigned:
            assigned.add(stem)
            stems.append(stem)
            continue
        n = 2
        while f"{stem}_{n}" in taken or f"{stem}_{n}" in assigned:
            n += 1
        name = f"{stem}_{n}"
        assigned.add(name)
        stems.append(name)
    return stems


def assign_stems(paths: Sequence[Path], out_dir: Path) -> tuple[list[str], dict[str, ExistingOutput]]:
    """Output names for the inputs, given the outputs already in the folder, and those outputs.

    An input whose output is already there (its record names this file, or failing that
    holds this content) gets that output's name back; an output without a record (older
    versions, or saved again by another program) is taken to be the input the plain naming
    gives it. Every other name in the folder belongs to some other input and is not reused.
    """
    existing = existing_outputs(out_dir)
    fixed: dict[int, str] = {}
    by_source: dict[str, list[str]] = {}
    for stem, output in existing.items():
        if output.record is not None:
            by_source.setdefault(output.record["source"], []).append(stem)
    resolved = []
    for path in paths:
        try:
            resolved.append(path.address if isinstance(path, RemoteStore) else str(Path(path).resolve()))
        except OSError:
            resolved.append(str(path))
    for index, source in enumerate(resolved):
        for stem in by_source.get(source, []):
            if stem not in fixed.values():
                fixed[index] = stem
                break
    # outputs whose recorded input moved: claimed by content, where an input still has no output
    orphans = [s for s, o in existing.items() if o.record is not None and o.record["source"] not in resolved]
    if orphans:
        from ..cache import file_digest

        for index, path in enumerate(paths):
            if index in fixed or isinstance(path, RemoteStore) or not Path(path).is_file():
                continue
            for stem in orphans:
                record = existing[stem].record
                if stem not in fixed.values() and record.get("size") == Path(path).stat().st_size \
                        and record.get("sha256") == file_digest(path):
                    fixed[index] = stem
                    break
    plain = natural_stems(paths)
    for index, stem in enumerate(plain):
        output = existing.get(stem)
        if index not in fixed and output is not None and output.record is None and stem not in fixed.values():
            fixed[index] = stem
    reserved = set(existing) - set(fixed.values())
    return natural_stems(paths, fixed, reserved), existing
