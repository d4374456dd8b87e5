"""Segmenting image files in a batch: inputs, unique output names, atomic writes, resumable runs, a report.

``segment_files`` is what ``clearclip-segment`` runs. Outputs of a file are written
only when it is done, each through a temporary file renamed into place, so an
interrupted batch leaves whole outputs only and a second run skips what exists.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import ClearClipError, ImageNotFoundError, InvalidImageError, InvalidOptionError, OutputError
from .files import PARTIAL_SUFFIX, write_atomic
from .options import SegmentOptions
from .provenance import assign_stems, make_record, natural_stems, read_record, same_content, tiff_metadata

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
REPORT_NAME = "clearclip_report.csv"


@dataclass
class FileReport:
    """What happened to one input: ``status`` is "done", "skipped" or "failed"."""

    path: Path
    status: str
    seconds: float = 0.0
    worker: str = ""
    error: str = ""
    outputs: list[Path] = field(default_factory=list)


# -- inputs --------------------------------------------------------------------------------------------

def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, the images inside folders (sorted, not recursive), and glob patterns expanded.

    A pattern that matches nothing, and a folder without images, stay in the list so
    that they are reported as failures rather than silently dropped.
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]  # one path, not the characters of its name
    paths: list[Path] = []
    for item in inputs:
        if isinstance(item, bytes):
            item = os.fsdecode(item)
        if not isinstance(item, (str, os.PathLike)):
            raise InvalidOptionError(f"Inputs must be paths (files, folders or glob patterns), not {item!r}.")
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            paths.extend(found or [path])
        elif not path.exists() and glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)) if os.path.isfile(p))
            paths.extend(matches or [path])
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))


def read_image(path: Path) -> np.ndarray:
    """Read an image file; TIFFs through tifffile, other formats through scikit-image."""
    path = Path(path)
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder with no images ({', '.join(IMAGE_SUFFIXES)}).")
    if not path.is_file():
        raise ImageNotFoundError(f"No such file: {path}")
    if path.stat().st_size == 0:
        raise InvalidImageError(f"{path} is empty (0 bytes): the file was not written completely; copy or export it again.")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from skimage.io import imread

        return imread(path)
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(f"Could not read {path} as an image: {_read_failure(path, exc)}") from None


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

def output_paths(out_dir: Path, stem: str, save_probabilities: bool = False) -> list[Path]:
    paths = [out_dir / f"{stem}_labels.tif", out_dir / f"{stem}_classes.csv"]
    if save_probabilities:
        paths.append(out_dir / f"{stem}_probabilities.tif")
    return paths


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
                  record: dict | None = None) -> list[Path]:
    """``<stem>_labels.tif`` (uint16, with the run's record), ``<stem>_classes.csv`` and optionally probabilities."""
    import tifffile

    labels_path, table_path, *prob_path = output_paths(out_dir, stem, save_probabilities)
    dtype = np.uint16 if len(result.class_names) < 65535 else np.uint32

    # the labels go last: their presence marks a finished file for resumed runs
    if prob_path:
        write_atomic(prob_path[0], lambda p: tifffile.imwrite(p, result.probabilities, photometric="minisblack",
                                                                   compression="zlib"))
    write_atomic(table_path, lambda p: _write_class_table(p, result.class_table()))
    write_atomic(labels_path, lambda p: _write_labels(p, result.labels.astype(dtype), record))
    return [labels_path, table_path, *prob_path]


def _write_class_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "name", "synonyms", "pixels"])
        writer.writeheader()
        writer.writerows(rows)


def _write_labels(path: Path, labels: np.ndarray, record: dict | None) -> None:
    import tifffile

    tifffile.imwrite(path, labels, photometric="minisblack", compression="zlib",
                     metadata=tiff_metadata(record) if record else {})


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
        labels = next((str(o) for o in r.outputs if str(o).endswith("_labels.tif")), "")
        rows[key] = {"file": key, "status": r.status, "seconds": f"{r.seconds:.2f}", "worker": r.worker,
                     "error": r.error, "labels": labels}

    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows.values())

    write_atomic(path, write)
    return path


# -- running -------------------------------------------------------------------------------------------

SKIPPED = "outputs exist (use --overwrite to replace them)"
SKIPPED_OTHER_RUN = ("outputs exist from a run with other classes, model or options, kept as they are "
                     "(use --overwrite to replace them)")
SKIPPED_CHANGED = "outputs exist for an earlier version of this file, kept as they are (use --overwrite to replace them)"
PARTS_DIR = ".clearclip-parts"
RUN_OVER = "the run this plane belonged to has ended"


@dataclass(frozen=True)
class Task:
    """One unit of work: a whole 2-D image (``plane`` None) or one plane of a stack.

    ``run`` fingerprints the classes, model and options; ``parts`` names the folder of a
    stack's plane results, tied to this run and this input's content.
    """

    path: Path
    stem: str
    plane: int | None = None
    planes: int = 1
    run: str = ""
    parts: str = ""


def skip_reason(record: dict | None, path: Path, run: str) -> str:
    """Why an input whose outputs exist is skipped, said so that a user sees when they are not this run's."""
    if record is None:
        return SKIPPED
    if not same_content(record, path):
        return SKIPPED_CHANGED
    if record.get("run") != run:
        return SKIPPED_OTHER_RUN
    return SKIPPED


def segment_file(segmenter, task: Task, classes, out_dir: Path, options: SegmentOptions,
                 save_probabilities: bool = False, overwrite: bool = False) -> FileReport:
    """Segment one 2-D image file and write its outputs; errors a user can act on become a "failed" report."""
    from .cluster import worker_name

    path, stem = task.path, task.stem
    start = time.perf_counter()
    outputs = output_paths(out_dir, stem, save_probabilities)
    if not overwrite and all(p.exists() for p in outputs):  # another run finished it meanwhile
        return FileReport(path, "skipped", 0.0, worker_name(), skip_reason(read_record(outputs[0]), path, task.run),
                          outputs)
    try:
        record = make_record(path, task.run, classes) if path.is_file() else None
        result = segmenter.segment(read_image(path), classes, options, maps=save_probabilities)
        written = write_outputs(result, out_dir, stem, save_probabilities, record)
    except ClearClipError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), str(exc))
    except OSError as exc:  # disk full, permissions changed mid-run ...
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), f"could not write outputs: {exc}")
    return FileReport(path, "done", time.perf_counter() - start, worker_name(), "", written)


# -- stacks: one task per plane ------------------------------------------------------------------------

def stack_planes(path: Path) -> tuple[tuple[int, ...], bool] | None:
    """(plane shape, rgb) of a multi-plane TIFF, read from its header alone; None for a 2-D image or non-TIFF."""
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tuple(tif.series[0].shape)
    except Exception:
        return None  # unreadable: the image task reports it
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
                return series.pages[index].asarray()
            data = series.asarray()
    except Exception as exc:
        raise InvalidImageError(f"Could not read plane {index} of {path}: {exc}") from None
    tail = 3 if data.ndim >= 3 and data.shape[-1] in (3, 4) else 2
    return data.reshape(count, *data.shape[-tail:])[index]


def parts_key(run: str, path: Path) -> str:
    """The parts folder's name: this run's fingerprint and this input's content, so no other run ever reads them."""
    from .cache import file_digest

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


def segment_plane(segmenter, task: Task, classes, out_dir: Path, options: SegmentOptions) -> FileReport:
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
        labels = segmenter.segment(read_plane(path, index, task.planes), classes, options, maps=False).labels

        def write(p: Path) -> None:
            with open(p, "wb") as handle:
                np.save(handle, labels.astype(np.uint16 if len(classes) < 65535 else np.uint32))

        write_atomic(part, write)
    except ClearClipError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), f"plane {index}: {exc}")
    except OSError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker_name(), f"plane {index}: {exc}")
    return FileReport(path, "done", time.perf_counter() - start, worker_name(), "", [part])


def assemble_stack(task: Task, out_dir: Path, leading: tuple[int, ...], classes, record: dict | None) -> list[Path]:
    """Stack the planes' labels into ``<stem>_labels.tif`` (with the class table) and remove the parts."""
    from .prompts import parse_classes

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
    write_atomic(labels_path, lambda p: _write_labels(p, labels, record))
    close_parts(out_dir, task.stem)
    return [labels_path, table_path]


# -- tasks ---------------------------------------------------------------------------------------------

def run_task(spec, task: Task, classes, out_dir: Path, options: SegmentOptions, save_probabilities: bool,
             overwrite: bool) -> FileReport:
    """What a worker (or this process) does for one task, with the model it keeps loaded."""
    from .cluster import segmenter_for

    segmenter = segmenter_for(spec)
    if task.plane is None:
        return segment_file(segmenter, task, classes, out_dir, options, save_probabilities, overwrite)
    return segment_plane(segmenter, task, classes, out_dir, options)


def check_model_and_options(spec, options: SegmentOptions) -> SegmentOptions:
    """Load the model (once per process) and resolve the options against it: both fail before any image is read."""
    from .cluster import segmenter_for

    return segmenter_for(spec).resolve_options(options)


def remove_stale_partials(out_dir: Path) -> None:
    """Temporary files of writes that a killed process never finished (named by ``write_atomic``)."""
    for folder in (out_dir, out_dir / PARTS_DIR):
        for stale in folder.rglob(f".*{PARTIAL_SUFFIX}") if folder.is_dir() else ():
            try:
                stale.unlink()
            except OSError:
                pass


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
    """
    from .cluster import ModelSpec
    from .prompts import parse_classes
    from .provenance import run_fingerprint

    class_list = [", ".join(c.synonyms) for c in parse_classes(classes)]
    options = SegmentOptions.build(options, **keywords)
    out = check_output_dir(out_dir)
    files = expand_inputs(paths)
    spec = ModelSpec(model, None if pretrained is None else os.fspath(pretrained), method, device, precision)
    # the model and the options fail here, once, before any image is read (on a cluster: on a worker)
    if client is None:
        options = check_model_and_options(spec, options)
    else:  # names and ranges here; the model itself is checked on a worker, once there is work
        options = options.resolved(spec.model)
    remove_stale_partials(out)
    run = run_fingerprint(spec.model, spec.pretrained, method, precision, class_list, options.to_dict())

    reports: list[FileReport] = []
    tasks: list[Task] = []
    stacks: dict[Path, tuple[tuple[int, ...], list[FileReport], dict | None]] = {}  # leading shape, planes, record
    stems, existing = assign_stems(files, out)
    for path, stem in zip(files, stems):
        layout = stack_planes(path)
        expected = output_paths(out, stem, save_probabilities and layout is None)  # stacks: labels and table
        if not overwrite and all(p.exists() for p in expected):
            output = existing.get(stem)
            reason = skip_reason(output.record if output else read_record(expected[0]), path, run)
            reports.append(FileReport(path, "skipped", 0.0, "", reason, expected))
            close_parts(out, stem)  # parts of an output that is whole are leftovers
            continue
        if layout is None:
            tasks.append(Task(path, stem, run=run))
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
        tasks.extend(Task(path, stem, i, count, run, key) for i in range(count))
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
        options = client.submit(check_model_and_options, spec, options, pure=False).result()
    args = (spec, class_list, out, options, save_probabilities, overwrite)
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
