"""Running a batch: tasks (a whole image, or one plane of a stack), resumable stacks, in this process or on dask.

``segment_files`` is what ``clearclip-segment`` runs. A file whose outputs exist is skipped
when they are its own (see :mod:`.provenance`); a stack's finished planes wait in a parts
folder tied to the exact run, so an interrupted run resumes and no other run reads them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import ClearClipError, InvalidOptionError
from ..files import write_atomic
from ..image_locations import RemoteStore
from ..options import DEFAULT, SegmentOptions
from ..reduced import REDUCED_SIDE, check_large_side
from ..tiff_images import is_tiff_path, open_tiff_levels
from ..zarr_images import check_absent_chunks, is_zarr_path
from .calibration import input_calibration, labels_zarr_attrs
from .files import (  # noqa: F401 - REPORT_NAME and PARTS_DIR are part of this module's interface
    OUTPUT_FORMATS,
    PARTS_DIR,
    REPORT_NAME,
    FileReport,
    _write_class_table,
    _write_labels,
    _write_objects_table,
    check_output_dir,
    expand_inputs,
    input_exists,
    longest_name_allowed,
    name_too_long,
    output_paths,
    read_foreground,
    read_image,
    read_lazy,
    read_lazy_objects,
    read_objects,
    read_plane,
    remove_stale_partials,
    stack_planes,
    write_outputs,
    write_report,
)
from .provenance import assign_stems, finished_labels, make_record, read_record, same_content


# -- running -------------------------------------------------------------------------------------------

SKIPPED = "outputs exist (use --overwrite to replace them)"
SKIPPED_OTHER_RUN = ("outputs exist from a run with other classes, model or options, kept as they are "
                     "(use --overwrite to replace them)")
SKIPPED_CHANGED = "outputs exist for an earlier version of this file, kept as they are (use --overwrite to replace them)"
SKIPPED_UNCHECKED = ("outputs exist, kept as they are, but the store could not be read now to tell whether they are of "
                     "what it holds (use --overwrite to replace them)")
RUN_OVER = "the run this plane belonged to has ended"


@dataclass(frozen=True)
class Task:
    """One unit of work: a whole 2-D image (``plane`` None) or one plane of a stack.

    ``run`` fingerprints the classes, model and options; ``parts`` names the folder of a
    stack's plane results, tied to this run and this input's content.
    """

    path: Path | RemoteStore   # a store read over the network is named by its address
    stem: str
    plane: int | None = None
    planes: int = 1
    run: str = ""
    parts: str = ""
    objects: str | None = None   # the suffix of the instance labels beside the image (--objects)
    foreground: str | None = None  # the suffix of the foreground map beside the image, or "found" (--foreground)
    found_weights: tuple | None = None  # FOUND's (DINO, decoder) files (--found-weights)
    output_format: str = "tif"   # "zarr": labels written tile by tile into <stem>_labels.zarr (--format zarr)
    absent_chunks: str = "error"  # a zarr input whose store lacks chunks: refused, or "fill" (--absent-chunks)
    large_side: int = REDUCED_SIDE  # a zarr input too large to hold, resized: its level of at most this side (--large-side)


def holds_another_run(report: FileReport) -> bool:
    """Whether ``report`` skipped an input whose outputs are not this run's labels (other classes, model or options,
    or an earlier version of the file): kept, but not what was asked for."""
    return report.status == "skipped" and report.error in (SKIPPED_OTHER_RUN, SKIPPED_CHANGED, SKIPPED_UNCHECKED)


def skip_reason(record: dict | None, path: Path, run: str) -> str:
    """Why an input whose outputs exist is skipped, said so that a user sees when they are not this run's."""
    if record is None:
        return SKIPPED
    if isinstance(path, RemoteStore):   # a network failure is not a store written again
        from ..zarr_images import remote_store_identity

        try:
            same = record.get("chunks") == remote_store_identity(path.address)["chunks"]
        except OSError:
            return SKIPPED_UNCHECKED
    else:
        same = same_content(record, path)
    if not same:
        return SKIPPED_CHANGED
    if record.get("run") != run:
        return SKIPPED_OTHER_RUN
    return SKIPPED


def unreadable_text(exc: RuntimeError) -> str:
    """A file's report for a RuntimeError while it was read or segmented (a zarr store's damaged chunk raises one
    from its decompressor): that file fails, the batch goes on."""
    return (f"could not be read or segmented ({type(exc).__name__}: {exc}); if it is a zarr store, a chunk may be "
            "damaged: copy the store again.")


def os_failure_text(path, exc: OSError) -> str:
    """A file's report for an OSError while it was segmented: its outputs could not be written (disk full,
    permissions changed mid-run ...), or, for a store at an address, it may have been the network."""
    if isinstance(path, RemoteStore):
        return f"could not read the store over the network or write outputs: {exc or type(exc).__name__}"
    return f"could not write outputs: {exc}"


def segment_file(segmenter, task: Task, classes, out_dir: Path, options: SegmentOptions,
                 save_probabilities: bool = False, overwrite: bool = False, lesson=None) -> FileReport:
    """Segment one 2-D image file and write its outputs; errors a user can act on become a "failed" report."""
    from .cluster import worker_name

    path, stem = task.path, task.stem
    start = time.perf_counter()
    outputs = output_paths(out_dir, stem, save_probabilities, task.objects is not None, task.output_format)
    done = None if overwrite else finished_labels(out_dir, stem)
    if done is not None:  # another run finished it meanwhile
        return FileReport(path, "skipped", 0.0, worker_name(), skip_reason(read_record(done), path, task.run),
                          outputs)
    if task.output_format == "zarr":
        return _replaced(_segment_to_zarr(segmenter, task, classes, outputs, options, start, lesson), out_dir, stem,
                         "zarr", overwrite)
    try:
        record = make_record(path, task.run, classes) if input_exists(path) else None   # a file, or a zarr store
        image, note = _image_at_its_level(segmenter, task, options)
        if note and record is not None:   # labels at a reduced size: where they sit on the image, in its pixels
            record["placement"] = _reduced_placement(segmenter, task, options)
        objects = None if task.objects is None else read_objects(path, task.objects)
        if note and objects is not None and tuple(objects.shape) != tuple(image.shape[:2]):
            raise InvalidOptionError(f"its objects are {tuple(objects.shape)}, but the image is {note}: give objects "
                                     "of the level's size, or --native to classify them at full size.")
        result = segmenter.segment(image, classes, options, maps=save_probabilities, objects=objects, lesson=lesson,
                                   **_foreground_of(task))
        written = write_outputs(result, out_dir, stem, save_probabilities, record, input_calibration(path))
    except ClearClipError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), str(exc))
    except RuntimeError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), unreadable_text(exc))
    except OSError as exc:  # disk full, permissions changed mid-run ...
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), os_failure_text(path, exc))
    return _replaced(FileReport(path, "done", time.perf_counter() - start, worker_name(),
                                with_collection_note(path, note), written), out_dir,
                     stem, "tif", overwrite)


def _replaced(report: FileReport, out_dir: Path, stem: str, output_format: str, overwrite: bool) -> FileReport:
    """With ``overwrite``, a finished output replaces the input's labels in the other format too, once this run's
    are in place: the class table written describes this run's labels only."""
    if overwrite and report.status == "done":
        other = out_dir / f"{stem}_labels.{'tif' if output_format == 'zarr' else 'zarr'}"
        if other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
        else:
            other.unlink(missing_ok=True)
    return report


def image_to_segment(segmenter, task: Task, options: SegmentOptions) -> tuple[np.ndarray, str]:
    """The image a file's run segments, and a note on it ("" for none): the level a slide too large to hold is
    segmented at (see :func:`_image_at_its_level`), and which image of a collection of several."""
    image, note = _image_at_its_level(segmenter, task, options)
    return image, with_collection_note(task.path, note)


def with_collection_note(path, note: str) -> str:
    """``note`` and, for a zarr store that is a collection of several images or a TIFF of several series, which of
    them was segmented."""
    if not is_zarr_path(path):
        from ..tiff_images import is_tiff_path, series_note

        return "; ".join(part for part in (note, series_note(path) if is_tiff_path(path) else "") if part)
    from ..zarr_images import collection_note

    return "; ".join(part for part in (note, collection_note(path)) if part)


def _image_at_its_level(segmenter, task: Task, options: SegmentOptions) -> tuple[np.ndarray, str]:
    """The image a file's run segments, and a note on it ("" for none).

    A file is read whole. So is a zarr store or a one-plane TIFF, unless the run resizes (the model then sees the
    image at its short side) and its planes exceed :data:`~napari_clearclip.reduced.LARGE_PIXELS` (and
    ``task.large_side`` squared): then, as in napari, its OME-Zarr or TIFF pyramid level of at most
    ``task.large_side`` pixels a side (or a copy reduced by block means, read a band at a time) is segmented and
    its labels have that size; the note says so.
    """
    from ..reduced import BlockMeans, limits_for_side, reduced_for_resize
    from ..zarr_images import open_zarr_levels

    if segmenter.resolve_options(options).short_side is None:
        return read_image(task.path, task.absent_chunks), ""
    tiff = is_tiff_path(task.path) and task.path.is_file()
    levels = open_tiff_levels(task.path) if tiff else open_zarr_levels(task.path) if is_zarr_path(task.path) else None
    if not levels:
        return read_image(task.path, task.absent_chunks), ""
    full = levels[0]
    if not (full.ndim == 2 or (full.ndim == 3 and full.shape[-1] in (1, 3, 4))):
        return read_image(task.path, task.absent_chunks), ""   # refused there, with why
    rgb = full.ndim == 3
    larger_than, level_pixels = limits_for_side(task.large_side)
    image, reduction = reduced_for_resize(levels, larger_than, rgb, level_pixels=level_pixels)
    if not tiff:   # a TIFF has no chunks that could be missing
        check_absent_chunks(image.source if isinstance(image, BlockMeans) else image, str(task.path),
                            task.absent_chunks)
    if reduction is None:
        return (read_image(task.path) if tiff else np.asarray(image)), ""
    height, width = full.shape[:2]
    return np.asarray(image), (f"{height} x {width} pixels, too large to hold: segmented at {reduction.describe()}, "
                               "and the labels have that size (--format zarr segments at full resolution, tile by "
                               "tile)")


def _reduced_placement(segmenter, task: Task, options: SegmentOptions) -> dict:
    """Where labels segmented at a reduced size sit on their image, in the image's pixels (as the widget places
    them): each label pixel covers ``factor`` pixels, centred on their centre. From the image's header alone."""
    from ..reduced import reduced_for_resize, limits_for_side
    from ..zarr_images import open_zarr_levels

    levels = open_tiff_levels(task.path) if is_tiff_path(task.path) else open_zarr_levels(task.path)
    larger_than, level_pixels = limits_for_side(task.large_side)
    _, reduction = reduced_for_resize(levels, larger_than, levels[0].ndim == 3, level_pixels=level_pixels)
    placed = reduction.geometry([1.0, 1.0], [0.0, 0.0])
    return {"scale": placed["scale"], "translate": placed["translate"]}


def _segment_to_zarr(segmenter, task: Task, classes, outputs: list[Path], options: SegmentOptions,
                     start: float, lesson=None) -> FileReport:
    """Segment one image tile by tile into ``<stem>_labels.zarr`` (class table written before the store is put in
    place, so the labels still mark a finished output); the image is read a region at a time."""
    import json

    from ..lazy_tiles import label_counts
    from ..prompts import parse_classes
    from .cluster import worker_name
    from .provenance import RECORD_KEY

    labels_path, table_path = outputs[:2]
    parsed = parse_classes(classes)

    def write_tables(labels, objects=None) -> None:
        counts = label_counts(labels, len(parsed))
        rows = [{"label": 0, "name": "unassigned", "synonyms": "", "pixels": int(counts[0])}]
        rows += [{"label": i, "name": c.name, "synonyms": ", ".join(c.synonyms), "pixels": int(counts[i])}
                 for i, c in enumerate(parsed, start=1)]
        write_atomic(table_path, lambda p: _write_class_table(p, rows))
        if objects is not None:
            write_atomic(outputs[-1], lambda p: _write_objects_table(p, objects))

    try:
        record = make_record(task.path, task.run, classes) if input_exists(task.path) else None
        objects = None if task.objects is None else read_lazy_objects(task.path, task.objects, task.absent_chunks)
        image = read_lazy(task.path, task.absent_chunks)
        attrs = {**({RECORD_KEY: json.dumps(record, sort_keys=True)} if record else {}),
                 **labels_zarr_attrs(task.path, tuple(image.shape[:2]))}
        absent = "fill" if is_tiff_path(task.path) else task.absent_chunks    # a TIFF has no chunks to lose
        segmenter.segment_tiled(image, classes, options, out=labels_path, replace=True, absent_chunks=absent,
                                lesson=lesson, objects=objects, attrs=attrs or None, on_complete=write_tables)
    except ClearClipError as exc:
        return FileReport(task.path, "failed", time.perf_counter() - start, worker_name(), str(exc))
    except RuntimeError as exc:
        return FileReport(task.path, "failed", time.perf_counter() - start, worker_name(), unreadable_text(exc))
    except OSError as exc:
        return FileReport(task.path, "failed", time.perf_counter() - start, worker_name(),
                          os_failure_text(task.path, exc))
    return FileReport(task.path, "done", time.perf_counter() - start, worker_name(), with_collection_note(task.path, ""),
                      [labels_path, table_path] + ([outputs[-1]] if task.objects is not None else []))


# -- stacks: one task per plane ------------------------------------------------------------------------

# -- stacks: one task per plane, their parts tied to the run ----------------------------------------

def parts_key(run: str, path: Path) -> str:
    """The parts folder's name: this run's fingerprint and this input's content, so no other run ever reads them."""
    from ..cache import file_digest

    return hashlib.sha256(f"{run}:{file_digest(path)}".encode()).hexdigest()[:20]


def parts_folder(out_dir: Path, stem: str, key: str) -> Path:
    return out_dir / PARTS_DIR / stem / key


def part_path(out_dir: Path, stem: str, key: str, index: int) -> Path:
    return parts_folder(out_dir, stem, key) / f"plane_{index:06d}.npy"


def open_parts(out_dir: Path, stem: str, key: str) -> None:
    """Make this run's parts folder for a stack, and remove any other run's parts of that output.

    Only the process that plans the run makes the folder; a task finds it or writes nothing,
    so a plane run again after its stack was assembled (a lost worker's) leaves nothing behind.
    """
    stem_dir = out_dir / PARTS_DIR / stem
    if stem_dir.is_dir():
        for other in stem_dir.iterdir():
            if other.name != key:
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
    parts_folder(out_dir, stem, key).mkdir(parents=True, exist_ok=True)


def close_parts(out_dir: Path, stem: str) -> None:
    """Remove a stack's parts (every run's), and the parts folder once empty."""
    shutil.rmtree(out_dir / PARTS_DIR / stem, ignore_errors=True)
    try:
        (out_dir / PARTS_DIR).rmdir()
    except OSError:
        pass


def segment_plane(segmenter, task: Task, classes, out_dir: Path, options: SegmentOptions, lesson=None) -> FileReport:
    """Segment one plane of a stack into a part file (kept until the stack is assembled, so runs resume)."""
    from .cluster import worker_name

    path, index = task.path, task.plane
    start = time.perf_counter()
    part = part_path(out_dir, task.stem, task.parts, index)
    if part.is_file():
        return FileReport(path, "done", 0.0, worker_name(), "", [part])
    if not part.parent.is_dir():
        return FileReport(path, "failed", 0.0, worker_name(), f"plane {index}: {RUN_OVER}")
    try:
        labels = segmenter.segment(read_plane(path, index, task.planes), classes, options, maps=False,
                                   lesson=lesson, **_foreground_of(task)).labels

        def write(p: Path) -> None:
            with open(p, "wb") as handle:
                np.save(handle, labels.astype(np.uint16 if len(classes) < 65535 else np.uint32))

        write_atomic(part, write)
    except ClearClipError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), f"plane {index}: {exc}")
    except RuntimeError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(),
                          f"plane {index}: {unreadable_text(exc)}")
    except OSError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), f"plane {index}: {exc}")
    return FileReport(path, "done", time.perf_counter() - start, worker_name(), "", [part])


def _foreground_of(task: Task) -> dict:
    """The foreground keywords of a task's run: a map read from beside the image, or FOUND's."""
    if task.foreground is None:
        return {}
    if task.foreground.lower() == "found":
        return {"foreground": "found", "found_weights": task.found_weights}
    return {"foreground": read_foreground(task.path, task.foreground)}


def assemble_stack(task: Task, out_dir: Path, leading: tuple[int, ...], classes, record: dict | None) -> list[Path]:
    """Stack the planes' labels into ``<stem>_labels.tif`` (with the class table) and remove the parts."""
    from ..prompts import parse_classes

    count = int(np.prod(leading))
    planes = []
    for i in range(count):
        try:
            planes.append(np.load(part_path(out_dir, task.stem, task.parts, i), allow_pickle=False))
        except ValueError as exc:
            raise OSError(f"the result of plane {i} is damaged ({exc})") from None
    if any(p.shape != planes[0].shape for p in planes):
        raise OSError("the planes' results differ in shape")
    labels = np.stack(planes).reshape(*leading, *planes[0].shape)
    parsed = parse_classes(classes)
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(parsed) + 1)
    rows = [{"label": 0, "name": "unassigned", "synonyms": "", "pixels": int(counts[0])}]
    rows += [{"label": i, "name": c.name, "synonyms": ", ".join(c.synonyms), "pixels": int(counts[i])}
             for i, c in enumerate(parsed, start=1)]
    labels_path, table_path = output_paths(out_dir, task.stem)
    write_atomic(table_path, lambda p: _write_class_table(p, rows))
    write_atomic(labels_path, lambda p: _write_labels(p, labels, record, input_calibration(task.path)))
    close_parts(out_dir, task.stem)
    return [labels_path, table_path]


# -- tasks ---------------------------------------------------------------------------------------------

def run_task(spec, task: Task, classes, out_dir: Path, options: SegmentOptions, save_probabilities: bool,
             overwrite: bool, lesson=None) -> FileReport:
    """What a worker (or this process) does for one task, with the model it keeps loaded."""
    from .cluster import segmenter_for

    segmenter = segmenter_for(spec)
    if task.plane is None:
        return segment_file(segmenter, task, classes, out_dir, options, save_probabilities, overwrite, lesson)
    return segment_plane(segmenter, task, classes, out_dir, options, lesson)


def _check_zarr_run(options: SegmentOptions, save_probabilities: bool, foreground) -> None:
    """What a tile-by-tile run cannot do, refused before any image is read (a lesson it can: it teaches every tile
    with the statistics of the whole image, gathered in a first pass over it; objects too: their sums are added up
    over the tiles)."""
    refused = [name for name, given in (("--save-probabilities", save_probabilities), ("--foreground", foreground))
               if given]
    if refused:
        raise InvalidOptionError(f"--format zarr segments tile by tile and writes labels only: {', '.join(refused)} "
                                 "cannot be used with it.")
    if options.short_side not in (DEFAULT, None):
        raise InvalidOptionError(f"--format zarr segments at native resolution: --short-side {options.short_side} "
                                 "cannot be used with it.")


def check_model_and_options(spec, options: SegmentOptions, classes=None, lesson=None) -> SegmentOptions:
    """Load the model (once per process) and resolve the options against it, and check that the lesson
    fits them: all fail before any image is read."""
    from ..prompts import parse_classes
    from .cluster import segmenter_for

    segmenter = segmenter_for(spec)
    resolved = segmenter.resolve_options(options)
    if lesson is not None:
        lesson.exemplars_for(segmenter, parse_classes(classes), resolved, spec.method)
    return resolved


def segment_files(
    paths: Iterable[str | os.PathLike],
    classes: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    method: str = "clearclip",
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    save_probabilities: bool = False,
    client=None,
    report: bool = True,
    on_report: Callable[[FileReport], None] | None = None,
    options: SegmentOptions | dict | None = None,
    objects: str | None = None,
    lesson=None,
    foreground: str | None = None,
    found_weights=None,
    output_format: str = "tif",
    absent_chunks: str = "error",
    large_side: int = REDUCED_SIDE,
    **keywords,
) -> list[FileReport]:
    """Segment image files (files, folders, glob patterns) into ``out_dir``; one :class:`FileReport` per input.

    Classes, options, the model and the output folder are checked before any image is
    read. Files whose outputs exist are skipped unless ``overwrite``; a bad input is
    reported and the others go on. Multi-plane TIFFs are segmented plane by plane and
    written as one labels stack. With a ``distributed.Client``, every image (and every
    plane of a stack) is a task on the cluster, each worker loading the model once; a
    task lost with its worker runs again elsewhere; ``client`` may also be a function that
    returns one, called only when something is left to compute (a finished batch run again
    starts no cluster). ``on_report`` is called as each file
    finishes. A report CSV (``clearclip_report.csv``) is written unless ``report=False``.
    ``objects`` (a suffix such as ``"_cp_masks"``) gives each object of ``<stem><suffix>.tif``
    beside each image a class, written as ``<stem>_objects.csv`` (2-D images). ``lesson`` (a
    :class:`~napari_clearclip.lessons.Lesson` or the path of a saved one) teaches every image
    with strokes made elsewhere; on a cluster it is sent to each worker once. ``foreground`` (a suffix:
    ``<stem><suffix>.tif`` beside each 2-D image, a probability map or a mask; or ``"found"``, with
    ``found_weights=(dino_checkpoint, decoder_checkpoint)``) fuses a foreground map as CLIP-DIY does.
    ``output_format="zarr"`` segments each 2-D image tile by tile at native resolution into
    ``<stem>_labels.zarr`` (zarr inputs are then read a region at a time): for images too large to hold; its
    ``objects`` may also be ``<stem><suffix>.zarr``, and are read a tile at a time.
    A zarr input whose store lacks chunks fails (zarr would read them as the fill value without a word) unless
    ``absent_chunks="fill"``. A zarr input too large to hold (planes over 4096 x 4096 pixels), in a run that
    resizes, is segmented at its OME-Zarr level (or a copy reduced by block means) of at most ``large_side``
    pixels a side, and its labels have that size.
    """
    from ..models import ModelSpec
    from ..prompts import parse_classes
    from .provenance import run_fingerprint

    from ..lessons import check_lesson

    class_list = [", ".join(c.synonyms) for c in parse_classes(classes)]
    options = SegmentOptions.build(options, **keywords)
    lesson = check_lesson(lesson)
    if output_format not in OUTPUT_FORMATS:
        raise InvalidOptionError(f"output_format={output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}.")
    check_absent_chunks(None, absent_chunks=absent_chunks)   # the value, before any image is read
    large_side = check_large_side(large_side)
    if output_format == "zarr":
        _check_zarr_run(options, save_probabilities, foreground)
        options = options.replace(short_side=None)
    out = check_output_dir(out_dir)
    files = expand_inputs(paths)
    if objects:  # the instance labels beside the images are not inputs of their own
        files = [f for f in files if not f.name.endswith((f"{objects}.tif", f"{objects}.zarr"))]
    found = foreground is not None and str(foreground).lower() == "found"
    if foreground:  # which class the map's complement scores: known before any image is read
        from ..clipdiy import background_index

        background_index(parse_classes(class_list), options.background_class)
    if foreground and not found:  # nor are the foreground maps
        files = [f for f in files if not f.name.endswith(f"{foreground}.tif")]
    if found:  # FOUND's weights fail here, before any image is read
        from ..found import check_found_weights

        found_weights = check_found_weights(found_weights)
    spec = ModelSpec(model, None if pretrained is None else os.fspath(pretrained), method, device, precision)
    # the model and the options fail here, once, before any image is read (on a cluster: on a worker)
    if client is None:
        options = check_model_and_options(spec, options, class_list, lesson)
    else:  # names and ranges here; the model itself is checked on a worker, once there is work
        options = options.resolved(spec.model, method=spec.method)
    remove_stale_partials(out)
    run = base_run = run_fingerprint(spec.model, spec.pretrained, method, precision, class_list,
                          {**options.to_dict(), "objects": objects, "foreground": foreground,
                           "format": output_format,
                           "found_weights": None if found_weights is None else list(found_weights),
                           "lesson": None if lesson is None else lesson.fingerprint()})
    # the level a large zarr input is segmented at is part of what its outputs are (other inputs do not depend on it)
    zarr_run = run if options.short_side is None or large_side == REDUCED_SIDE else run_fingerprint(
        spec.model, spec.pretrained, method, precision, class_list, {"run": run, "large_side": large_side})

    reports: list[FileReport] = []
    tasks: list[Task] = []
    stacks: dict[Path, tuple[tuple[int, ...], list[FileReport], dict | None]] = {}  # leading shape, planes, record
    stems, existing = assign_stems(files, out)
    name_limit = longest_name_allowed(out)
    for path, stem in zip(files, stems):
        too_long = name_too_long(output_paths(out, stem), name_limit)  # labels and class table, every input's
        if too_long is not None:  # said before any computing (before the file is looked at); the others go on
            reports.append(FileReport(path, "failed", 0.0, "", too_long))
            continue
        layout = stack_planes(path)
        run = zarr_run if is_zarr_path(path) else base_run
        if output_format == "zarr":
            layout = None  # one image, read a region at a time (stacks are refused when it is opened)
        expected = output_paths(out, stem, save_probabilities and layout is None, bool(objects) and layout is None,
                                output_format)
        too_long = name_too_long(expected, name_limit)  # and what this input writes besides
        if too_long is not None:
            reports.append(FileReport(path, "failed", 0.0, "", too_long))
            continue
        done = None if overwrite else finished_labels(out, stem)
        if done is not None:   # labels in either format: this input's outputs, not replaced unless asked
            output = existing.get(stem)
            reason = skip_reason(output.record if output else read_record(done), path, run)
            reports.append(FileReport(path, "skipped", 0.0, "", reason, expected))
            close_parts(out, stem)  # parts of an output that is whole are leftovers
            continue
        if layout is None:
            tasks.append(Task(path, stem, run=run, objects=objects or None, foreground=foreground or None,
                              found_weights=found_weights, output_format=output_format,
                              absent_chunks=absent_chunks, large_side=large_side))
            continue
        if objects:
            reports.append(FileReport(path, "failed", 0.0, "", "objects (--objects) are taken for 2-D images only"))
            continue
        if foreground and not found:
            reports.append(FileReport(path, "failed", 0.0, "", "foreground maps beside the images (--foreground) are "
                                      "taken for 2-D images only; --foreground found works on stacks"))
            continue
        try:
            key = parts_key(run, path)
            record = make_record(path, run, class_list)
            open_parts(out, stem, key)
        except OSError as exc:
            reports.append(FileReport(path, "failed", 0.0, "", f"could not prepare the stack: {exc}"))
            continue
        count = int(np.prod(layout[0]))
        stacks[path] = (layout[0], [], record)
        tasks.extend(Task(path, stem, i, count, run, key, foreground=foreground if found else None,
                          found_weights=found_weights) for i in range(count))
    for item in reports:
        if on_report is not None:
            on_report(item)

    done_stacks: set[Path] = set()

    def finished(task: Task, item: FileReport) -> None:
        if task.plane is None:
            reports.append(item)
        else:
            leading, planes, record = stacks[task.path]
            planes.append(item)
            if len(planes) < task.planes:
                return
            failed = [p for p in planes if p.status == "failed"]
            seconds = sum(p.seconds for p in planes)
            workers = ", ".join(sorted({p.worker for p in planes if p.worker}))
            if failed:
                item = FileReport(task.path, "failed", seconds, workers, "; ".join(p.error for p in failed[:3]))
            else:
                try:
                    written = assemble_stack(task, out, leading, class_list, record)
                    item = FileReport(task.path, "done", seconds, workers, "", written)
                    done_stacks.add(task.path)
                except OSError as exc:
                    item = FileReport(task.path, "failed", seconds, workers, f"could not write outputs: {exc}")
            reports.append(item)
        if on_report is not None:
            on_report(item)

    if tasks and client is not None:
        if not hasattr(client, "submit"):  # a callable that starts a cluster: only now that there is work
            client = client()
        if lesson is not None:  # sent to every worker once, not with every task
            lesson = client.scatter(lesson, broadcast=True, hash=False)
        options = client.submit(check_model_and_options, spec, options, class_list, lesson, pure=False).result()
    args = (spec, class_list, out, options, save_probabilities, overwrite, lesson)
    try:
        if client is None:
            for task in tasks:
                finished(task, run_task(spec, task, *args[1:]))
        elif tasks:
            _run_on_cluster(client, tasks, args, finished)
    finally:
        for task in tasks:  # a finished stack's parts, again: no late plane may leave one behind
            if task.plane == 0 and task.path in done_stacks:
                close_parts(out, task.stem)
        remove_stale_partials(out)
        if report and reports:
            write_report(reports, out / REPORT_NAME)
    return reports


def _run_on_cluster(client, tasks: list[Task], args, finished) -> None:
    """Submit every task, and hand back each result as it completes (lost workers' tasks rerun elsewhere)."""
    from .cluster import require_distributed

    distributed = require_distributed()
    spec, *rest = args
    futures = {}
    for task in tasks:
        key = f"clearclip-{task.stem}-{'all' if task.plane is None else task.plane}-{os.getpid()}-{id(tasks)}"
        futures[client.submit(run_task, spec, task, *rest, key=key, pure=False)] = task
    try:
        for future in distributed.as_completed(list(futures)):
            task = futures.pop(future)
            try:
                item = future.result()
            except Exception as exc:  # the task itself broke, or its workers kept dying
                item = FileReport(task.path, "failed", 0.0, "", f"{type(exc).__name__}: {exc}")
            # forgotten by the scheduler at once: a worker that dies later must not make it run again
            future.release()
            del future
            finished(task, item)
    except BaseException:
        client.cancel(list(futures))
        raise


# -- features only: a cluster encodes, laptops annotate ------------------------------------------------

def store_task(spec, task: Task, options: SegmentOptions, store_dir: str | None) -> FileReport:
    """Encode one image (or one plane of a stack) into the feature store, unless it is stored already."""
    from ..feature_store import FeatureStore, default_root
    from .cluster import segmenter_for, worker_name

    start = time.perf_counter()
    segmenter = segmenter_for(spec)
    wanted = Path(store_dir) if store_dir is not None else default_root()   # a worker's segmenter outlives a run
    if segmenter.feature_store is None or segmenter.feature_store.root != wanted:
        segmenter.feature_store = FeatureStore(store_dir)
    try:
        # what a run segments: a slide too large to hold at its level, as its runs (and napari) will
        image, note = (image_to_segment(segmenter, task, options) if task.plane is None
                       else (read_plane(task.path, task.plane, task.planes), ""))
        stored = segmenter.cache_features(image, options)
    except (ClearClipError, RuntimeError) as exc:
        where = "" if task.plane is None else f"plane {task.plane}: "
        said = str(exc) if isinstance(exc, ClearClipError) else unreadable_text(exc)
        return FileReport(task.path, "failed", time.perf_counter() - start, worker_name(), f"{where}{said}")
    if not stored:
        return FileReport(task.path, "failed", time.perf_counter() - start, worker_name(),
                          "the features could not be stored (too large for the store, or it cannot be written)")
    return FileReport(task.path, "done", time.perf_counter() - start, worker_name(), note)


def store_features(paths: Iterable[str | os.PathLike], *, model: str = "ViT-B-16", pretrained: str | None = None,
                   method: str = "clearclip", device: str = "auto", precision: str = "auto",
                   options: SegmentOptions | dict | None = None, store: str | os.PathLike | None = None, client=None,
                   on_report: Callable[[FileReport], None] | None = None, absent_chunks: str = "error",
                   large_side: int = REDUCED_SIDE, **keywords) -> list[FileReport]:
    """Encode image files into the feature store (``store``: a folder, by default the user cache), segmenting nothing.

    What ``clearclip-segment --features-only`` runs: a cluster (``client``) encodes a folder once,
    and napari on any machine that reads the same store folder (``NAPARI_CLEARCLIP_FEATURE_STORE``)
    segments those images with any classes without encoding them again. Features depend on the
    model, method and window settings, which must be those the annotators will use; a zarr input too large to
    hold, resized, is encoded at its level of at most ``large_side`` pixels a side, as napari segments it with
    "Large images at" set to that side.
    """
    from ..models import ModelSpec

    options = SegmentOptions.build(options, **keywords)
    check_absent_chunks(None, absent_chunks=absent_chunks)
    large_side = check_large_side(large_side)
    files = expand_inputs(paths)
    spec = ModelSpec(model, None if pretrained is None else os.fspath(pretrained), method, device, precision)
    options = check_model_and_options(spec, options) if client is None else options
    store_dir = None if store is None else os.fspath(Path(store).resolve())
    tasks = []
    for path in files:
        layout = stack_planes(path)
        if layout is None:
            tasks.append(Task(path, path.stem, absent_chunks=absent_chunks, large_side=large_side))
        else:
            count = int(np.prod(layout[0]))
            tasks.extend(Task(path, path.stem, i, count) for i in range(count))
    by_file: dict[Path, list[FileReport]] = {}
    reports: list[FileReport] = []

    def finished(task: Task, item: FileReport) -> None:
        planes = by_file.setdefault(task.path, [])
        planes.append(item)
        if len(planes) < task.planes:
            return
        failed = [p for p in planes if p.status == "failed"]
        item = FileReport(task.path, "failed" if failed else "done", sum(p.seconds for p in planes),
                          ", ".join(sorted({p.worker for p in planes if p.worker})),
                          "; ".join(p.error for p in (failed or planes)[:3] if p.error))
        reports.append(item)
        if on_report is not None:
            on_report(item)

    if client is not None and tasks:
        if not hasattr(client, "submit"):
            client = client()
        # the model loaded and the options resolved on a worker first: weights it cannot get fail the run at once,
        # said as in this process, not once per image
        options = client.submit(check_model_and_options, spec, options, pure=False).result()
        distributed = __import__("distributed")
        futures = {client.submit(store_task, spec, task, options, store_dir, pure=False): task for task in tasks}
        for future in distributed.as_completed(list(futures)):
            task = futures.pop(future)
            try:
                item = future.result()
            except Exception as exc:
                item = FileReport(task.path, "failed", 0.0, "", f"{type(exc).__name__}: {exc}")
            future.release()
            finished(task, item)
    else:
        for task in tasks:
            finished(task, store_task(spec, task, options, store_dir))
    return reports
