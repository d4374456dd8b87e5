"""Peak memory and time of a tile-by-tile run on an image too large to hold, from a zarr store to a zarr store.

    python benchmarks/benchmark_large_zarr.py [--size 20000] [--snap] [--tile 2048] [--format tif] [--lesson]
                                              [--objects]

Writes a ``size`` x ``size`` RGB zarr store (synthetic shapes, written chunk by chunk) in a temporary
folder, then runs ``clearclip-segment store.zarr --format zarr`` (demo model, 5 classes, native
resolution) in a fresh process and samples its resident memory every 50 ms. Prints the peak resident
memory of the whole process (Python, torch, the model and everything), the time, and the image's
size in memory for comparison. Nothing is kept. ``--format tif`` runs the command's default instead
(the image resized, labels to a TIFF): a store this large is then segmented at a reduced copy. ``--lesson``
teaches the run with a lesson made at native resolution from strokes on two demo scenes (``--format zarr``: a
first pass over the image gathers its statistics). ``--objects`` writes instance labels beside the store (a grid of
objects of 37 x 41 pixels, uint32, as cellpose masks of cells would be: 250,000 objects at 20000 x 20000; many cross
tiles) and gives each a class (``--objects _cells``: their sums are added up over the tiles, then a second pass
writes their classes; ``<name>_objects.csv``). ``--served`` runs the command a second time on the same store served
over HTTP on 127.0.0.1 by a server that lists no folder (as a remote store is read: by its address, its record told by
its metadata and 16 chunks), and prints that run's time and memory against the local one's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, size: int, chunk: int = 1024) -> None:
    import zarr

    from napari_clearclip.demo.scenes import make_scene

    tile = make_scene(5, size=1000, objects=(12, 16)).image
    array = zarr.create_array(str(path), shape=(size, size, 3), chunks=(chunk, chunk, 3), dtype=np.uint8)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            ys, xs = (np.arange(y, y + h) % 1000), (np.arange(x, x + w) % 1000)
            array[y : y + h, x : x + w] = tile[ys][:, xs]


def write_objects(path: Path, size: int, chunk: int = 1024) -> int:
    """A grid of objects of 37 x 41 pixels, ids from 1 row by row; returns how many."""
    import zarr

    per_row = -(-size // 41)
    array = zarr.create_array(str(path), shape=(size, size), chunks=(chunk, chunk), dtype=np.uint32)
    for y in range(0, size, chunk):
        rows = np.arange(y, min(y + chunk, size)) // 37
        array[y : y + len(rows)] = (rows[:, None] * per_row + np.arange(size)[None] // 41 + 1).astype(np.uint32)
    return int(-(-size // 37) * per_row)


def write_lesson(path: Path, native: bool) -> Path:
    """A lesson of the benchmark's classes from strokes on every shape of two demo scenes."""
    from napari_clearclip import Segmenter
    from napari_clearclip.demo.scenes import make_scene

    classes = ["red", "green", "blue", "yellow", "background"]
    painted = []
    for seed in (31, 32):
        scene = make_scene(seed, size=512, objects=(6, 8))
        strokes = np.zeros(scene.image.shape[:2], np.int32)
        for number, name in enumerate(classes, start=1):
            if name in scene.masks:
                ys, xs = np.nonzero(scene.masks[name])
                strokes[ys[::9][:200], xs[::9][:200]] = number
        painted.append((scene.image, strokes))
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    return segmenter.make_lesson(classes, painted, **({"short_side": None} if native else {})).save(path)


def peak_resident(process, wait):
    """(peak resident bytes of ``process``, sampled every 50 ms until ``wait()`` returns, what it returned)."""
    import psutil

    watched, peak, done = psutil.Process(process.pid), [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], watched.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    try:
        result = wait()
    finally:
        done.set()
    return peak[0], result


def same_labels(first: Path, second: Path, output_format: str) -> bool:
    """Whether two runs wrote the same labels (a band of rows at a time)."""
    if output_format == "tif":
        import tifffile

        return bool(np.array_equal(tifffile.imread(first / "slide_labels.tif"),
                                   tifffile.imread(second / "slide_labels.tif")))
    import zarr

    a, b = (zarr.open_group(str(out / "slide_labels.zarr"), mode="r")["labels"] for out in (first, second))
    return a.shape == b.shape and all(np.array_equal(a[y : y + 2048], b[y : y + 2048]) for y in range(0, a.shape[0], 2048))


def serve_unlisted(folder: Path) -> str:
    """The address of ``folder`` served over HTTP on 127.0.0.1 by a server that lists no folder, in a thread."""
    import functools
    import http.server

    class Unlisted(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def list_directory(self, path):
            self.send_error(404)

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 64
        daemon_threads = True

    server = Server(("127.0.0.1", 0), functools.partial(Unlisted, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--snap", action="store_true", help="snap to edges (PAMR), as the CLI does by default")
    parser.add_argument("--format", choices=("zarr", "tif"), default="zarr",
                        help="zarr: tile by tile at native resolution; tif: the command's default (resized)")
    parser.add_argument("--lesson", action="store_true", help="teach the run with a lesson (see above)")
    parser.add_argument("--objects", action="store_true", help="give a class to each of a grid of objects (see above)")
    parser.add_argument("--served", action="store_true", help="also read the store by its address (see above)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    try:
        store = folder / "slide.zarr"
        start = time.perf_counter()
        write_store(store, args.size)
        print(f"wrote a {args.size} x {args.size} RGB store in {time.perf_counter() - start:.0f} s", flush=True)
        command = [sys.executable, "-c", "import sys; from napari_clearclip.batch.cli import main; sys.exit(main())",
                   str(store), "--classes", "red; green; blue; yellow; background", "--model", "synthetic-tiny",
                   "--device", "cpu", "--format", args.format, "--out", str(folder / "out"),
                   "--snap" if args.snap else "--no-snap"]
        if args.lesson:
            command += ["--lesson", str(write_lesson(folder / "lesson", native=args.format == "zarr"))]
        count = 0
        if args.objects:
            count = write_objects(folder / "slide_cells.zarr", args.size)
            command += ["--objects", "_cells"]
        env = {"NAPARI_CLEARCLIP_CACHE_DIR": str(folder / "cache"), "PATH": "/usr/bin:/bin"}
        import os

        env = {**os.environ, **env}
        image_gib = args.size * args.size * 3 / 2**30
        snapping = "on" if args.snap else "off"
        lesson = (", a lesson" if args.lesson else "") + (f", {count} objects" if count else "")
        runs = [("on disk", command)]
        if args.served:
            address = serve_unlisted(folder) + "/slide.zarr"
            runs.append(("served over HTTP", [address if part == str(store) else part for part in command[:-1]]
                         + ["--out", str(folder / "out-served"), command[-1]]))
        measured = []
        for where, argv in runs:
            start = time.perf_counter()
            process = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
            peak, code = peak_resident(process, process.wait)
            seconds = time.perf_counter() - start
            measured.append(seconds)
            print(f"| {args.size} x {args.size} RGB {where}, --format {args.format}, tile {args.tile}, snapping "
                  f"{snapping}{lesson} | {seconds / 60:.2f} min | peak resident {peak / 2**30:.2f} GiB | image "
                  f"{image_gib:.2f} GiB, labels {args.size * args.size / 2**30:.2f} GiB | exit {code} |", flush=True)
        if len(measured) == 2:
            print(f"served / on disk: {measured[1] / measured[0]:.2f}x the time; the same labels: "
                  f"{same_labels(folder / 'out', folder / 'out-served', args.format)}")
        if count:
            rows = sum(1 for _ in open(folder / "out" / "slide_objects.csv")) - 1 if code == 0 else 0
            print(f"objects table: {rows} rows of {count} objects")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
