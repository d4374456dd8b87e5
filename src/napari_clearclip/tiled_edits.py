"""What a user painted on labels written tile by tile into a zarr store: strokes for the next run on that image.

A napari layer backed by the store writes each stroke into its ``labels`` array. The store also keeps a
``baseline`` (the labels as the run wrote them) and the ``strokes`` that taught that run, so that a pixel whose
label differs from the baseline was painted since, and a pixel painted before still teaches. Both are read a
band or a part at a time, as the run reads the image.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from .hashing import sampled_digest
from .image_locations import image_location, remote_address
from .labels_cache import DISCARDED, labels_folder

#: Rows copied at a time when the baseline is written.
BAND_ROWS = 2048


class EditedStrokes:
    """An array-like of a store's strokes for a run with other (or the same) classes: where a pixel's label differs
    from the baseline, its label (the eraser is no hint); elsewhere the strokes that taught the run that wrote it.
    A label means the class it had in that run, and is a hint for that class under its number in the new run (a
    class no longer asked for, or a label the user invented, is none)."""

    def __init__(self, store, names: Sequence[str], new_names: Sequence[str]):
        """``store``: the path of a result's store, or labels opened for painting in a working copy
        (:class:`~napari_clearclip.editable_copy.EditableCopy`), whose baseline is the store it was opened from."""
        from .editable_copy import EditableCopy

        self.before = None
        if isinstance(store, EditableCopy):   # pixels painted before the store was saved keep their labels' class
            self.labels, self.baseline, self.carried = store, store.source, None
            self.before = store.painted_before
        else:
            import zarr

            group = zarr.open_group(str(store), mode="r")
            self.labels, self.baseline = group["labels"], group["baseline"]
            self.carried = group["strokes"] if "strokes" in group else None
        self.lookup = np.zeros(len(names) + 1, np.int64)
        for value, name in enumerate(names, start=1):
            self.lookup[value] = list(new_names).index(name) + 1 if name in new_names else 0
        self.shape = tuple(self.labels.shape)
        self.dtype = np.dtype(np.uint8 if len(new_names) < 256 else np.int32)
        self.ndim = 2

    def __getitem__(self, key) -> np.ndarray:
        """The strokes over ``key`` (slices), in the stored labels' own type until the lookup (a band of a
        20000-pixel-wide slide stays a few bytes a pixel)."""
        current = np.asarray(self.labels[key])
        edited = current != np.asarray(self.baseline[key])
        if self.before is not None:
            edited |= np.asarray(self.before[key], dtype=bool)
        values = np.where(edited, current, 0 if self.carried is None else np.asarray(self.carried[key]))
        values[(values < 0) | (values >= len(self.lookup))] = 0   # labels the user invented are no hint
        return self.lookup.astype(self.dtype)[values]


class PaintedPixels:
    """Which pixels of labels too large to hold were painted by hand, read a band at a time (a boolean array-like):
    those whose label differs from what the run wrote, and those painted before (the strokes that taught that run,
    or those saved with the labels they were opened from), whatever their label now. What Save labels... keeps
    with such labels, so that they teach again when opened another day."""

    def __init__(self, labels, baseline, before=None):
        self.labels, self.baseline, self.before = labels, baseline, before
        self.shape = tuple(int(n) for n in labels.shape)
        self.dtype = np.dtype(bool)
        self.ndim = len(self.shape)

    @classmethod
    def of(cls, data, store: str | Path | None = None) -> "PaintedPixels | None":
        """The painted pixels of a Labels layer's ``data``: labels opened for painting in a working copy
        (:class:`~napari_clearclip.editable_copy.EditableCopy`), or a result's ``store`` that keeps its baseline;
        None for anything else."""
        from .editable_copy import EditableCopy

        if isinstance(data, EditableCopy):
            return cls(data, data.source, data.painted_before)
        if store is None or not has_baseline(store):
            return None
        import zarr

        group = zarr.open_group(str(store), mode="r")
        return cls(data, group["baseline"], group["strokes"] if "strokes" in group else None)

    def __getitem__(self, key) -> np.ndarray:
        edited = np.asarray(self.labels[key]) != np.asarray(self.baseline[key])
        if self.before is not None:
            edited |= np.asarray(self.before[key]) != 0
        return edited


def labels_shape(store: str | Path) -> tuple[int, ...] | None:
    """The shape of a result's labels, from their metadata file (a run looks through every result of the cache on
    napari's GUI thread: a few hundredths of a millisecond, where opening the store takes about one); opened when
    the store is not of zarr's third format; None when it holds no labels."""
    import json

    import zarr

    try:
        shape = json.loads((Path(store) / "labels" / "zarr.json").read_text()).get("shape")
        return tuple(int(n) for n in shape) if isinstance(shape, list) else None
    except FileNotFoundError:   # not a folder of zarr's third format: opened
        pass
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    try:
        return tuple(zarr.open_group(str(store), mode="r")["labels"].shape)
    except (OSError, ValueError, KeyError, FileNotFoundError):
        return None


def has_baseline(store: str | Path) -> bool:
    """Whether a labels store keeps the baseline that tells what was painted on it since. A store in a folder is
    judged from its arrays' metadata files (a tenth of a millisecond, where opening it takes a few: a run looks
    through every result of the cache)."""
    import json

    import zarr

    folder = Path(store)
    try:
        shapes = [json.loads((folder / name / "zarr.json").read_text()).get("shape") for name in ("labels", "baseline")]
        return isinstance(shapes[0], list) and shapes[0] == shapes[1]
    except FileNotFoundError:   # not a folder of zarr's third format: opened
        pass
    except (OSError, ValueError, AttributeError):
        return False
    try:
        group = zarr.open_group(str(store), mode="r")
        return "baseline" in group and "labels" in group and group["baseline"].shape == group["labels"].shape
    except (OSError, ValueError, KeyError, FileNotFoundError):
        return False


def keep_baseline(store: str | Path, parts=None) -> None:
    """Write into a finished labels store its ``baseline`` (a copy of its labels, a band of rows at a time) and the
    ``strokes`` that taught its run (:class:`~napari_clearclip.lazy_tiles.PaintedParts`, or None)."""
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    labels = group["labels"]
    baseline = group.create_array("baseline", shape=labels.shape, chunks=labels.chunks, dtype=labels.dtype,
                                  fill_value=0, overwrite=True)
    for start in range(0, labels.shape[0], BAND_ROWS):
        baseline[start : start + BAND_ROWS] = labels[start : start + BAND_ROWS]
    if parts is None:
        return
    strokes = group.create_array("strokes", shape=labels.shape, chunks=labels.chunks, dtype=labels.dtype,
                                 fill_value=0, overwrite=True)
    for (top, left), part, _ in parts.parts:
        region = (slice(top, top + part.shape[0]), slice(left, left + part.shape[1]))
        strokes[region] = np.where(part > 0, part, strokes[region]).astype(labels.dtype)


#: Where a result's store records its image's file and classes (in its attributes).
RESULT_RECORD_KEY = "napari-clearclip tiled result"
#: This process, in the records of the results it makes: a result whose layer was removed in this session was
#: discarded by the user; one left by a napari that has closed holds corrections to keep.
SESSION = uuid.uuid4().hex


def image_identity(image_file: str | Path) -> dict:
    """What tells a later run whether the image's file is still the one a result was made from: a file's ``size``,
    modification time (``mtime_ns``) and :func:`sampled_digest` (``sample``, which a copy elsewhere keeps), a
    folder's (a zarr store's) digest of its files' names, sizes and times (``tree``; reading every chunk again would
    cost what the run did). A remote store (an address: :func:`~napari_clearclip.image_locations.remote_address`) by
    a digest of its metadata and of chunks spread over it (``chunks``: a web server tells no times, and lists no
    folder); nothing but its address where it cannot be read as a zarr store."""
    location = image_location(image_file)
    if remote_address(location) is not None:
        from .zarr_images import remote_store_identity

        try:
            return {"size": None, **remote_store_identity(location)}
        except OSError:
            return {"size": None}
    path = Path(location)
    if path.is_file():
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample": sampled_digest(path)}
    if path.is_dir():
        from .zarr_images import store_identity

        return {"size": None, "tree": store_identity(path)["sha256"]}
    return {"size": None}


def pixels_identity(image) -> dict | None:
    """What finds an image of no file again in a later napari: a digest of its pixels, shape and type
    (``pixels``), for an array held in memory in one piece; None for others (lazy arrays would be read whole: their
    results are not found again)."""
    import hashlib

    from .hashing import pixel_digest

    if not isinstance(image, np.ndarray) or not image.flags.c_contiguous:
        return None
    digest = hashlib.blake2b(pixel_digest(image), digest_size=20)
    digest.update(repr((tuple(image.shape), image.dtype.str)).encode())
    return {"pixels": digest.hexdigest()}


#: The most pixel values :func:`pixels_sample` reads: a grid of about 256 x 256 points of a plane.
SAMPLED_VALUES = 1 << 16


def pixels_sample(image) -> str | None:
    """A digest of an image's values on a regular grid (about 65,000 of them, whatever its size: a millisecond),
    with its shape (axes of length 1 left out) and type, for an array held in memory; None for others (lazy and
    memory-mapped arrays are not read for it). It tells apart images that a reader plugin gives from one file (the
    scenes or positions of a CZI, LIF or ND2 file, of one size): the file is their only location, so labels or
    results recorded with it must also match this."""
    import hashlib

    if not isinstance(image, np.ndarray) or isinstance(image, np.memmap) or image.ndim == 0:
        return None   # (a memory-mapped file would be read a page for every value)
    image = np.squeeze(image)   # (readers differ in the axes of length 1 they add: (1, 1, y, x) or (y, x))
    steps, left = [1] * image.ndim, float(SAMPLED_VALUES)
    for placed, axis in enumerate(sorted(range(image.ndim), key=lambda axis: image.shape[axis])):
        taken = max(1, min(image.shape[axis], int(left ** (1 / (image.ndim - placed)))))   # short axes whole
        steps[axis], left = max(1, -(-image.shape[axis] // taken)), left / taken
    grid = image[tuple(slice(None, None, step) for step in steps)]
    digest = hashlib.blake2b(np.ascontiguousarray(grid).tobytes(), digest_size=16)
    digest.update(repr((tuple(image.shape), image.dtype.str)).encode())
    return digest.hexdigest()


def keep_result_record(store: str | Path, image_file: str | None, names: Sequence[str],
                       identity: dict | None = None) -> None:
    """Record in a result's store its classes and the file of its image (``source``, ``size`` to know a copy of it
    by, as a labels file's record does, and what tells whether the file was written again since: ``identity``, as
    :func:`image_identity` found it when the run read the image, else now), so that a later run on that file finds
    it (:func:`kept_results`). An image of no file is known by its :func:`pixels_identity`, when ``identity`` is
    one."""
    import zarr

    record = {"names": list(names), "source": None, "size": None, "session": SESSION}
    if image_file:
        location = image_location(image_file)
        record.update(source=location, **(identity if identity is not None else image_identity(location)))
    elif identity is not None and identity.get("pixels"):
        record["pixels"] = identity["pixels"]
    zarr.open_group(str(store), mode="r+").attrs[RESULT_RECORD_KEY] = record


def result_record(store: str | Path) -> dict | None:
    """The record :func:`keep_result_record` kept in a result's store, or None."""
    import json

    try:
        record = json.loads((Path(store) / "zarr.json").read_text()).get("attributes", {}).get(RESULT_RECORD_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def another_file(record: dict, image_file: str | Path) -> bool:
    """Whether the file at ``image_file``, of another path than the record's image but of its name and size (what
    marks a copy of it), holds other content: the record's :func:`sampled_digest` differs (none recorded, by an
    earlier version: not known to be another). A remote store at another address is another."""
    try:
        location = image_location(image_file)
        if location == record.get("source"):
            return False
        if remote_address(location) is not None:
            return True
        path = Path(location)
        if "sample" not in record:
            return False
        return sampled_digest(path) != record["sample"]
    except OSError:
        return True


def same_image_file(record: dict, path) -> bool:
    """Whether the file at ``path`` is the image a labels record was made from: the same file, or a copy of it
    (a folder copied from the machine that segmented it: the same name and size, and, where the record has it, the
    same bytes in blocks spread over the file; images of one shape in other folders often share name and size). A
    remote store is its address alone."""
    try:
        location = image_location(path)
        if location == str(record.get("source", "")):
            return True
        if remote_address(location) is not None:
            return False
        path, source = Path(location), Path(str(record.get("source", "")))
        return (path.name == source.name and path.is_file() and path.stat().st_size == record.get("size")
                and not another_file(record, path))
    except (OSError, TypeError, ValueError):
        return False


def image_changed_since(store: str | Path, image_file: str | None) -> bool:
    """Whether the file at ``image_file``, where the result in ``store`` was made from, was written again since (its
    size, time or files differ from the record's; a remote store's metadata or sampled chunks): strokes painted on
    that result marked what the image showed then, and must not teach a run on what it holds now. A remote store that
    cannot be read now is not taken as written again (the run reading it fails; a moment's network failure must not
    cost the strokes, which go with a result whose image changed). A copy at another path is known by its name and
    size alone, as before; a record without the file's time (written by an earlier version) tells nothing."""
    record = result_record(store)
    if not record or not image_file:
        return False
    try:
        location = image_location(image_file)
        if location != record.get("source"):
            return False
        now = image_identity(location)
    except OSError:
        return True   # the file is gone or cannot be read: not the image the strokes were painted on
    if not any(key in record for key in ("mtime_ns", "tree", "chunks")):
        return False
    if "chunks" in record and "chunks" not in now:
        return False
    return any(record.get(key) != now.get(key) for key in ("size", "mtime_ns", "tree", "chunks"))


def kept_results(folder: str | Path | None = None, before: float | None = None) -> list[tuple[Path, dict]]:
    """The stores of results segmented tile by tile in ``folder`` (the user cache's ``labels`` folder) that keep
    their record (:func:`keep_result_record`) and baseline, with that record, the newest first; only those finished
    before ``before`` (a time), when given. A discarded result (its layer removed) is none of them."""
    import json

    if folder is None:
        folder = labels_folder()
    found = []
    for path in Path(folder).glob("*.zarr") if Path(folder).is_dir() else []:
        try:
            record = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get(RESULT_RECORD_KEY)
            written = (path / "zarr.json").stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        if before is not None and written >= before:
            continue
        if isinstance(record, dict) and not record.get(DISCARDED) and has_baseline(path):
            found.append((written, path, record))
    return [(path, record) for _, path, record in sorted(found, key=lambda item: (item[0], str(item[1])), reverse=True)]


def painted_count(parts) -> int:
    """How many pixels the strokes of :class:`~napari_clearclip.lazy_tiles.PaintedParts` paint (0 for None)."""
    return 0 if parts is None else int(sum(int((part > 0).sum()) for _, part, _ in parts.parts))


def changed_pixels(before, after) -> int:
    """How many pixels are painted differently (painted, erased or given another class) in ``after`` than in
    ``before`` (:class:`~napari_clearclip.lazy_tiles.PaintedParts` of the same image, or None)."""
    if before is not None and after is not None and before.digest == after.digest:
        return 0
    width = max([left + part.shape[1] for parts in (before, after) if parts is not None
                 for (_, left), part, _ in parts.parts] or [1])

    def painted(parts):  # (flat index, class) of every painted pixel: each in one part only
        if parts is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        where, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for (top, left), part, _ in parts.parts:
            ys, xs = np.nonzero(part)
            where.append((ys + top).astype(np.int64) * width + xs + left)
            values.append(part[ys, xs].astype(np.int64))
        return np.concatenate(where), np.concatenate(values)

    (old_at, old), (new_at, new) = painted(before), painted(after)
    keys, index = np.unique(np.concatenate([old_at, new_at]), return_inverse=True)
    then, now = np.zeros(len(keys), np.int64), np.zeros(len(keys), np.int64)
    then[index[: len(old_at)]], now[index[len(old_at) :]] = old, new
    return int((then != now).sum())
