"""``clearclip-segment``: segment image files from the command line.

    clearclip-segment cells/*.tif --classes "cell, nucleus; background; debris" --out results/

Writes ``<name>_labels.tif`` (0 = unassigned, 1..C in the given order) and
``<name>_classes.csv`` per input, each as soon as it is done, plus a report
``clearclip_report.csv``. Inputs may be files, folders and glob patterns. A file
whose outputs exist is skipped (``--overwrite`` replaces them), so an interrupted
batch resumes where it stopped. Bad inputs are reported and skipped; the exit
status is 1 if any input failed, 2 if nothing could start, 130 if interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from ..choices import DEVICES, METHOD_NAMES, PRECISIONS
from ..errors import ClearClipError, InvalidOptionError, WeightsUnavailableError
from ..options import SNAP_IN_TOOLS, SegmentOptions
from ..reduced import REDUCED_SIDE


def _large_side(text: str) -> int:
    """--large-side's value, refused by argparse with the range when it is not one."""
    from ..reduced import SIDE_RANGE

    try:
        side = int(text)
    except ValueError:
        side = None
    if side is None or not SIDE_RANGE[0] <= side <= SIDE_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of pixels from {SIDE_RANGE[0]} to "
                                         f"{SIDE_RANGE[1]}")
    return side


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearclip-segment",
        description="Segment images into named classes with ClearCLIP (training-free, frozen CLIP weights).",
        epilog=__doc__.split("\n\n", 2)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+",
                        help="image files (TIFF, whole-slide TIFFs such as .svs and .ndpi, PNG, JPEG, ...), zarr stores "
                             "(.zarr, OME-Zarr; also by address: https://..., s3://...), folders or glob patterns")
    parser.add_argument("--classes", default=None,
                        help="classes separated by ';', synonyms by ',': \"sky; horse, pony; grass\"")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those files)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: ViT-B-16)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (default: openai) or a local checkpoint file")
    parser.add_argument("--method", default="clearclip", choices=list(METHOD_NAMES))
    parser.add_argument("--device", default="auto", choices=list(DEVICES))
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    parser.add_argument("--prob-threshold", type=float, default=0.0,
                        help="pixels whose best class probability is below this get label 0 (default: 0)")
    parser.add_argument("--short-side", type=int, default=None,
                        help="resize so the short side has this many pixels (default: the model's, 448)")
    parser.add_argument("--native", action="store_true", help="segment at the native resolution, no resizing")
    parser.add_argument("--crop", type=int, default=None, help="window size (default: the model's, 448)")
    parser.add_argument("--stride", type=int, default=None, help="window stride (default: the model's, 224)")
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="softmax temperature of the class probabilities (default: 50; ResCLIP's own 40, CLIP-DIY's 1)")
    parser.add_argument("--preset", default=None,
                        help="ResCLIP's official settings by name: demo (default), voc21, voc20, context60, context59, "
                             "coco_object, coco_stuff, cityscapes, ade20k")
    parser.add_argument("--template", action="append", dest="templates",
                        help="prompt template with {} for the class name; repeat for several "
                             "(default: the 80 ImageNet templates; CLIP-DIY: \"a photo of a {}\")")
    parser.add_argument("--snap", action=argparse.BooleanOptionalAction, default=SNAP_IN_TOOLS,
                        help="snap masks to the image's edges (PAMR refinement), as the napari widget does by default; "
                             "--no-snap gives the paper's exact pipeline (default: %(default)s)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write <name>_probabilities.tif")
    parser.add_argument("--format", dest="output_format", default="tif", choices=["tif", "zarr"],
                        help="zarr: segment each image tile by tile at native resolution into <name>_labels.zarr, "
                             "reading .zarr inputs (arrays, OME-Zarr) a region at a time: for images too large to "
                             "hold (default: tif)")
    parser.add_argument("--absent-chunks", choices=["error", "fill"], default="error",
                        help="a .zarr input whose store lacks chunks: fail (error; zarr would read them as the fill "
                             "value, so a copy that lost chunks would be segmented wrongly), or read them as the fill "
                             "value (fill: for stores that leave out chunks holding only it, as zarr 3 writes by "
                             "default) (default: %(default)s)")
    parser.add_argument("--large-side", type=_large_side, default=REDUCED_SIDE, metavar="PIXELS",
                        help="with resizing (the default), a .zarr input too large to hold (over 4096 x 4096 pixels) is "
                             "segmented at its OME-Zarr level, or a copy reduced by block means, of at most PIXELS "
                             "a side, and its labels have that size; more gives finer labels and takes more memory "
                             "(default: %(default)s)")
    parser.add_argument("--objects", metavar="SUFFIX",
                        help="give a class to each object of <name>SUFFIX.tif beside each image (instance labels, "
                             "e.g. from cellpose: --objects _cp_masks); writes <name>_objects.csv. With --format zarr, "
                             "<name>SUFFIX.zarr or .tif, read a tile at a time (objects crossing tiles are classified "
                             "over all of them)")
    parser.add_argument("--foreground", metavar="SUFFIX|found",
                        help="fuse a foreground map with the class scores as CLIP-DIY does (background class times "
                             "1 - map, the others times the map): <name>SUFFIX.tif beside each image (probabilities "
                             "0..1, or a mask such as cellpose's), or 'found' for FOUND's saliency (--found-weights)")
    parser.add_argument("--found-weights", nargs=2, metavar=("DINO", "DECODER"), type=Path, default=None,
                        help="FOUND's weights: DINO ViT-S/8 checkpoint and decoder_weights.pt (default: torch's "
                             "cache, downloading once with a network)")
    parser.add_argument("--background-class", default=None,
                        help="the class the foreground map's complement scores (default: the class called background)")
    parser.add_argument("--keep-aspect", action="store_true",
                        help="CLIP-DIY: keep the image's proportions (officially it is squashed to 256 x 256)")
    parser.add_argument("--lesson", metavar="FILE", type=Path,
                        help="teach every image with the strokes saved in a lesson file (napari: Save lesson...; "
                             "Python: Segmenter.make_lesson(...).save(FILE)); its classes, model and method must "
                             "be this run's")
    parser.add_argument("--features-only", action="store_true",
                        help="only encode the images into the feature store (no labels): napari, or a later run, "
                             "then segments them with any classes without encoding them again")
    parser.add_argument("--feature-store", metavar="DIR", type=Path, default=None,
                        help="the feature store folder (default: the user cache, bounded to 2 GiB; napari reads "
                             "another one named by NAPARI_CLEARCLIP_FEATURE_STORE); with a cluster, a folder every "
                             "worker can write. A folder named here is never trimmed unless "
                             "NAPARI_CLEARCLIP_FEATURE_STORE_BYTES (e.g. 500G) bounds it")
    where = parser.add_argument_group("running on several processes or machines (needs the 'distributed' extra)")
    exclusive = where.add_mutually_exclusive_group()
    exclusive.add_argument("--cluster", metavar="local[:N]",
                           help="start a dask LocalCluster of N worker processes on this machine "
                                "(default N: one per two cores); each loads the model once")
    exclusive.add_argument("--scheduler", metavar="ADDRESS",
                           help="use a running dask scheduler, e.g. tcp://host:8786 (dask scheduler / dask worker, "
                                "or dask-jobqueue); the output folder must be reachable by every worker")
    return parser


def engine_options(args: argparse.Namespace) -> SegmentOptions:
    """The run's options from the command line (what is not given takes the model's own default)."""
    keywords = {"prob_threshold": args.prob_threshold, "templates": args.templates,
                "refine": "pamr" if args.snap else None, "preset": args.preset,
                "keep_aspect": args.keep_aspect, "background_class": args.background_class}
    if args.logit_scale is not None:
        keywords["logit_scale"] = args.logit_scale
    if args.native:
        keywords["short_side"] = None
    elif args.short_side is not None:
        keywords["short_side"] = args.short_side
    if args.crop is not None:
        keywords["crop"] = args.crop
    if args.stride is not None:
        keywords["stride"] = args.stride
    return SegmentOptions.build(**keywords)


#: Seconds a stopped run waits at exit for image features still being written to the feature store.
INTERRUPTED_EXIT_WAIT = 5.0


class StopOnce:
    """Ctrl-C stops a run once: the first press raises KeyboardInterrupt, later ones only say that it is stopping.

    Cleaning up (closing a cluster, removing temporary files) then finishes, and no second
    KeyboardInterrupt prints a traceback from inside it or at exit. Outside the main thread
    (where Python delivers no signals) it does nothing.
    """

    def __init__(self):
        self.interrupted = False
        self._previous = None
        self._previous_hook = None

    def __enter__(self) -> "StopOnce":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._first)
            self._previous_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, unraisable) -> None:
        """A KeyboardInterrupt that Python could not raise (it came inside a callback, e.g. one of the import
        machinery's) is not printed: the press is recorded and the run stops at its next image (see ``_run``)."""
        if self.interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        (self._previous_hook or sys.__unraisablehook__)(unraisable)

    def _first(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._again)
        store = sys.modules.get("napari_clearclip.feature_store")  # not loaded: no features are being written
        if store is not None:  # they are a cache: the process does not wait long for them at exit
            store.shorten_exit_wait(INTERRUPTED_EXIT_WAIT)
        raise KeyboardInterrupt

    def _again(self, signum, frame) -> None:
        try:
            print("stopping: finishing what is being written, please wait...", file=sys.stderr, flush=True)
        except Exception:
            pass

    def __exit__(self, *exc) -> None:
        # after an interrupt the quiet handlers stay until the process ends, atexit hooks included
        if self._previous is not None and not self.interrupted:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._previous_hook


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with StopOnce() as stop:
        try:
            return _run(args, stop)
        except KeyboardInterrupt:
            print("interrupted: finished images are kept; run the same command again to resume.", file=sys.stderr)
            return 130


NO_CLASSES = 'No classes: name at least one with --classes, separated by ";" (e.g. --classes "cell, nucleus; background").'


def offline_message(exc) -> str:
    """Weights that cannot be downloaded, said in the command line's own options."""
    from ..models import local_checkpoint_model

    model, tag = exc.model or "the model", exc.tag or "default"
    local = local_checkpoint_model(exc.model, exc.tag) if exc.model and exc.tag else model
    return (f"the {model} '{tag}' weights are not on this computer and cannot be downloaded now (no network). "
            f"Use a weights file: --model {local} --pretrained FILE"
            f"{' (the -quickgelu model matches OpenAI weights)' if local != model else ''}; "
            "or try the offline demo model: --model synthetic-tiny (it knows only coloured shapes).")


#: The command line's option for each engine option, and what it can say beyond the engine's rule.
OPTION_FLAGS = {"short_side": ("--short-side", "; or --native keeps the image's own size"), "crop": ("--crop", ""),
                "stride": ("--stride", ""), "logit_scale": ("--logit-scale", ""),
                "prob_threshold": ("--prob-threshold", ""), "preset": ("--preset", ""),
                "keep_aspect": ("--keep-aspect", ""),
                "background_class": ("--background-class", "; leave it out for the class called background")}


def option_message(exc: InvalidOptionError) -> str:
    """An option out of range said with the command line's option (``--stride 999 must be ...``), where it has one."""
    if exc.option not in OPTION_FLAGS or not exc.rule:
        return str(exc)
    flag, more = OPTION_FLAGS[exc.option]
    given = "" if isinstance(exc.value, bool) else f" {exc.value!r}" if isinstance(exc.value, str) else f" {exc.value}"
    return f"{flag}{given} {exc.rule}{more}."


def _said_error(exc: Exception, bar) -> int:
    """An error the user can act on, in the command line's terms (weights that cannot come, options out of range:
    its options); exit 2."""
    bar.close()
    said = (offline_message(exc) if isinstance(exc, WeightsUnavailableError)
            else option_message(exc) if isinstance(exc, InvalidOptionError) else str(exc))
    print(f"error: {said}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace, stop: StopOnce | None = None) -> int:
    from tqdm import tqdm

    from .files import check_output_dir
    from .runs import holds_another_run, segment_files

    if not args.features_only and not (args.classes or "").replace(";", "").strip():
        print(f"error: {NO_CLASSES}", file=sys.stderr)
        return 2
    started: dict = {}
    client = None
    if args.cluster or args.scheduler:
        from .cluster import parse_cluster, parse_scheduler_address, start_client

        try:
            check_output_dir(args.out)
            parse_scheduler_address(args.scheduler) if args.scheduler else parse_cluster(args.cluster)
        except ClearClipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

        def client():  # started when there is work: a finished batch run again starts no cluster
            started["client"], started["cluster"] = start_client(args.cluster, args.scheduler)
            return started["client"]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    failures: list[str] = []
    bar = tqdm(unit="image", desc="clearclip", disable=None)

    others: list[str] = []   # skipped inputs whose outputs hold another run's labels

    def on_report(report) -> None:
        counts[report.status] += 1
        if holds_another_run(report):
            others.append(str(report.path))
        if report.status == "failed":
            failures.append(str(report.path))
            tqdm.write(f"error: {report.path}: {report.error}", file=sys.stderr)
        elif report.status == "skipped":
            tqdm.write(f"skipped: {report.path}: {report.error}", file=sys.stderr)
        elif report.error:   # done, with a note (e.g. the level a slide was segmented at)
            tqdm.write(f"note: {report.path}: {report.error}", file=sys.stderr)
        bar.update(1)
        if stop is not None and stop.interrupted:
            # Ctrl+C was pressed, but its KeyboardInterrupt never arrived: Python raises it wherever the process
            # is, and inside some callbacks (e.g. one of the import machinery's) it is printed and dropped
            raise KeyboardInterrupt

    if args.features_only:
        return _store_only(args, client, on_report, bar, started, stop)
    if args.feature_store is not None:
        os.environ["NAPARI_CLEARCLIP_FEATURE_STORE"] = str(args.feature_store.resolve())
    reports = _finished(lambda: segment_files(
        args.images, args.classes, args.out, model=args.model, pretrained=args.pretrained, method=args.method,
        device=args.device, precision=args.precision, overwrite=args.overwrite,
        save_probabilities=args.save_probabilities, client=client, on_report=on_report,
        options=engine_options(args), objects=args.objects, lesson=args.lesson, foreground=args.foreground,
        found_weights=args.found_weights, output_format=args.output_format, absent_chunks=args.absent_chunks,
        large_side=args.large_side),
        bar, started, args.out, stop,
        lambda: ("1 finished image is kept" if counts["done"] == 1 else f"{counts['done']} finished images are kept")
        + "; run the same command again to resume.")
    if isinstance(reports, int):
        return reports
    total = len(reports)
    skipped = f", {counts['skipped']} skipped (outputs exist)" if counts["skipped"] else ""
    print(f"{counts['done']} of {total} images segmented into {args.out}{skipped}", file=sys.stderr)
    if others:  # kept, as they may hold corrections, but not this command's labels: a script must not take them
        print(f"not this run's labels: {', '.join(others)} (their outputs come from other classes, model or options, "
              "or an earlier version of the file, or a store that could not be read to tell; --overwrite replaces "
              "them, or choose another --out)",
              file=sys.stderr)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures or others else 0


def _finished(work: Callable[[], list], bar, started: dict, out, stop: StopOnce | None,
              kept: Callable[[], str]) -> list | int:
    """The reports of ``work`` (a batch over the inputs), or the exit code when it stopped: 2 and the advice for an
    error the user can act on, 130 and what is ``kept`` (said when asked: the count grows while it runs) for Ctrl+C.
    The client and cluster this command started are closed either way, before anything is said (their workers'
    logs of the shutdown come first: what the user must read ends the output)."""
    try:
        reports = work()
    except ClearClipError as exc:
        _close_started(started, out)
        return _said_error(exc, bar)
    except KeyboardInterrupt:
        _close_started(started, out)
        bar.close()
        print(f"interrupted: {kept()}", file=sys.stderr)
        return 130
    finally:
        _close_started(started, out)
    bar.close()
    if stop is not None and stop.interrupted:  # pressed after the last image, its KeyboardInterrupt dropped
        print(f"interrupted: {kept()}", file=sys.stderr)
        return 130
    return reports


def _close_started(started: dict, out) -> None:
    """Close the client and the local cluster this command started; then remove the partial files in ``out``
    that the cluster's killed workers never finished."""
    from .files import remove_stale_partials

    client, cluster = started.pop("client", None), started.pop("cluster", None)   # (closed once)
    if client is not None:
        client.close()
    if cluster is not None:
        _workers_gone(cluster)
        cluster.close()
        remove_stale_partials(out)


#: The longest a local cluster's workers are given to leave before the cluster is closed around them.
WORKERS_LEAVE_S = 10.0


def _workers_gone(cluster) -> None:
    """Let a local cluster's workers leave before its scheduler goes: a worker whose heartbeat meets a closed
    scheduler prints dask's traceback of it after the command's own last line."""
    import time

    try:
        cluster.scale(0)
    except Exception:  # a cluster already failing: closed as it is
        return
    deadline = time.monotonic() + WORKERS_LEAVE_S
    while cluster.workers and time.monotonic() < deadline:
        time.sleep(0.05)


def _store_only(args, client, on_report, bar, started, stop: StopOnce | None = None) -> int:
    """clearclip-segment --features-only: encode every input into the feature store, segment nothing."""
    from .runs import store_features

    reports = _finished(lambda: store_features(
        args.images, model=args.model, pretrained=args.pretrained, method=args.method, device=args.device,
        precision=args.precision, options=engine_options(args), store=args.feature_store, client=client,
        on_report=on_report, absent_chunks=args.absent_chunks, large_side=args.large_side),
        bar, started, args.out, stop,
        lambda: "the images encoded so far are stored; run the same command again to go on.")
    if isinstance(reports, int):
        return reports
    from ..feature_store import FeatureStore, filled_share

    done = sum(r.status == "done" for r in reports)
    store = FeatureStore(args.feature_store)
    where = store.root if args.feature_store or os.environ.get("NAPARI_CLEARCLIP_FEATURE_STORE") else \
        f"the user cache ({store.root})"
    print(f"{done} of {len(reports)} images' features stored in {where}", file=sys.stderr)
    kept = len(list(store.root.glob("*.zarr"))) if store.root.is_dir() else 0
    if store.max_bytes is not None and (kept < done or filled_share(store) >= 0.9):
        print(f"note: {where} is bounded to {store.max_bytes / (1 << 30):.3g} GiB and is full: the stores read least "
              "recently are removed to make room (some of this run's already), so those images will be encoded "
              "again. Name a folder with "
              "--feature-store DIR (never trimmed), or raise the bound with NAPARI_CLEARCLIP_FEATURE_STORE_BYTES "
              "(e.g. 50G).", file=sys.stderr)
    return 1 if done < len(reports) else 0


if __name__ == "__main__":
    sys.exit(main())
