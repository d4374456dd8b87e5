"""Segmenting image files in a batch: inputs, unique output names, atomic writes, resumable runs, a report.

``segment_files`` is what ``clearclip-segment`` runs. Outputs of a file are written
only when it is done, each through a temporary file renamed into place, so an
interrupted batch leaves whole outputs only and a second run skips what exists.
"""

from __future__ import annotations

import csv
import glob
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import ClearClipError, ImageNotFoundError, InvalidImageError, OutputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
REPORT_NAME = "clearclip_report.csv"
PARTIAL_SUFFIX = ".partial"


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
    paths: list[Path] = []
    for item in inputs:
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
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        from skimage.io import imread

        return imread(path)
    except Exception as exc:
        raise InvalidImageError(f"Could not read {path} as an image: {exc}") from None


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per input, unique even when inputs share a name or collide with a suffixed one.

    Inputs whose file name is unique keep it; repeats get ``_2``, ``_3`` ..., skipping
    any name another input already has, so ``a/x.png b/x.png x_2.png`` gives x, x_3, x_2.
    """
    natural = [p.stem for p in paths]
    counts: dict[str, int] = {}
    for stem in natural:
        counts[stem] = counts.get(stem, 0) + 1
    taken = set(natural)
    assigned: set[str] = set()
    stems = []
    for stem in natural:
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


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename it into place; nothing partial stays."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave a partial file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_outputs(result, out_dir: Path, stem: str, save_probabilities: bool = False) -> list[Path]:
    """``<stem>_labels.tif`` (uint16), ``<stem>_classes.csv`` and optionally ``<stem>_probabilities.tif``."""
    import tifffile

    labels_path, table_path, *prob_path = output_paths(out_dir, stem, save_probabilities)
    dtype = np.uint16 if len(result.class_names) < 65535 else np.uint32

    def write_table(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["label", "name", "synonyms", "pixels"])
            writer.writeheader()
            writer.writerows(result.class_table())

    # the labels go last: their presence marks a finished file for resumed runs
    if prob_path:
        write_atomic(prob_path[0], lambda p: tifffile.imwrite(p, result.probabilities, compression="zlib"))
    write_atomic(table_path, write_table)
    write_atomic(labels_path, lambda p: tifffile.imwrite(p, result.labels.astype(dtype), compression="zlib"))
    return [labels_path, table_path, *prob_path]


def write_report(reports: Sequence[FileReport], path: Path) -> Path:
    """A CSV with one row per input: file, status, seconds, worker, error."""
    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "status", "seconds", "worker", "error"])
            for r in reports:
                writer.writerow([str(r.path), r.status, f"{r.seconds:.2f}", r.worker, r.error])

    write_atomic(path, write)
    return path


# -- running -------------------------------------------------------------------------------------------

def segment_file(segmenter, path: Path, stem: str, classes, out_dir: Path, options: dict,
                 save_probabilities: bool = False, overwrite: bool = False) -> FileReport:
    """Segment one file and write its outputs; errors a user can act on become a "failed" report."""
    start = time.perf_counter()
    outputs = output_paths(out_dir, stem, save_probabilities)
    worker = socket.gethostname()
    if not overwrite and all(p.exists() for p in outputs):
        return FileReport(path, "skipped", 0.0, worker, "outputs exist (use --overwrite to replace them)", outputs)
    try:
        result = segmenter.segment(read_image(path), classes, maps=save_probabilities, **options)
        written = write_outputs(result, out_dir, stem, save_probabilities)
    except ClearClipError as exc:
        return FileReport(path, "failed", time.perf_counter() - start, worker, str(exc))
    except OSError as exc:  # disk full, permissions changed mid-run ...
        return FileReport(path, "failed", time.perf_counter() - start, worker, f"could not write outputs: {exc}")
    return FileReport(path, "done", time.perf_counter() - start, worker, "", written)


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
    report: bool = True,
    on_report: Callable[[FileReport], None] | None = None,
    **options,
) -> list[FileReport]:
    """Segment image files (files, folders, glob patterns) into ``out_dir``; one :class:`FileReport` per input.

    Classes, options, the model and the output folder are checked before any image is
    read. Files whose outputs exist are skipped unless ``overwrite``; a bad input is
    reported and the others go on. ``on_report`` is called as each file finishes.
    A report CSV (``clearclip_report.csv``) is written to ``out_dir`` unless ``report=False``.
    """
    from .prompts import parse_classes
    from .segmenter import Segmenter

    class_list = [", ".join(c.synonyms) for c in parse_classes(classes)]
    out = check_output_dir(out_dir)
    files = expand_inputs(paths)
    segmenter = Segmenter(model, pretrained, method=method, device=device, precision=precision)
    segmenter.check_options(**options)
    reports = []
    try:
        for path, stem in zip(files, output_stems(files)):
            item = segment_file(segmenter, path, stem, class_list, out, options, save_probabilities, overwrite)
            reports.append(item)
            if on_report is not None:
                on_report(item)
    finally:
        if report and reports:
            write_report(reports, out / REPORT_NAME)
    return reports
