"""Images too large to hold (dask, zarr, OME-Zarr levels): read, segment and write tile by tile at native resolution.

Each tile is segmented inside a larger region: the tile plus a halo of ``crop`` pixels (every window
that covers a tile pixel lies inside the region) plus edge snapping's reach (``max(dilations) x
(iterations + 1)``), with the region's start on the window grid (a multiple of the stride). The
windows covering a tile pixel are then the very windows of a whole-image computation, added in the
same order, and snapping reads the same neighbours, so the tile's labels equal the whole image's (but where
two classes tie to the last bit: labels are computed relative to the class leading most of the region, which
may not be the one leading most of the image, and rounding may then settle the tie the other way).

Only one region is in memory at a time (its pixels, scores and labels); nothing of it is kept
afterwards. The labels go into ``out``: a NumPy array, a zarr array, or a path where a zarr store
is written (in a ``.partial`` folder renamed into place when complete; an interrupted run resumes
from the tiles it finished).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from dataclasses import replace as with_fields
from pathlib import Path
from typing import Generator, Mapping, Sequence

import numpy as np

from .errors import InvalidImageError, InvalidOptionError, OutputError
from .options import DEFAULT, SegmentOptions

from .progress import Progress

#: Tile side (pixels) by default: regions of about (2048 + 2 x halo)^2 pixels are segmented at once.
DEFAULT_TILE = 2048


def check_lazy_image(image) -> tuple[int, int]:
    """(height, width) of an array-like image, checked without reading its pixels."""
    shape = tuple(getattr(image, "shape", ()))
    dtype = np.dtype(getattr(image, "dtype", np.float64))
    if dtype.kind not in "uif":
        store = getattr(getattr(image, "array", image), "store_path", None)   # a zarr array (or its OME-Zarr view)
        what = f"The zarr array at {store} holds {dtype}" if store is not None else f"Images of dtype {dtype}"
        raise InvalidImageError(f"{what}: not supported; use uint8, uint16 or float.")
    if not (len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))):
        raise InvalidImageError(f"Image of shape {shape} is not supported: expected (H, W) grey, (H, W, 3) RGB or "
                                "(H, W, 4) RGBA; segment a stack one plane at a time.")
    return int(shape[0]), int(shape[1])


def tile_plan(height: int, width: int, tile: int, halo: int, stride: int) -> list[tuple[tuple, tuple]]:
    """Per tile, ((y0, y1, x0, x1) of the tile, (y0, y1, x0, x1) of the region segmented for it)."""
    def spans(size: int):
        for start in range(0, size, tile):
            end = min(start + tile, size)
            first = max(0, (start - halo) // stride * stride) if start > halo else 0
            yield (start, end), (first, min(size, end + halo))

    return [((ty0, ty1, tx0, tx1), (ry0, ry1, rx0, rx1))
            for (ty0, ty1), (ry0, ry1) in spans(height) for (tx0, tx1), (rx0, rx1) in spans(width)]


def label_counts(labels, n_classes: int, rows: int = DEFAULT_TILE) -> np.ndarray:
    """Pixels per label (0 .. n_classes) of a labels array, read a band of rows at a time."""
    counts = np.zeros(n_classes + 1, np.int64)
    for start in range(0, labels.shape[0], rows):
        band = np.asarray(labels[start : start + rows])
        counts += np.bincount(band.ravel().astype(np.int64), minlength=n_classes + 1)[: n_classes + 1]
    return counts


def label_dtype(n_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if n_classes < 255 else np.uint16 if n_classes < 65535 else np.uint32)


def _value_range(image, height: int, rows: int) -> tuple[float, float]:
    """The image's min and max, read a band of rows at a time (for non-uint8 images without contrast limits)."""
    low, high = math.inf, -math.inf
    for start in range(0, height, rows):
        band = np.asarray(image[start : start + rows])
        if band.dtype.kind == "f" and not np.isfinite(band).all():
            raise InvalidImageError("The image holds NaN or infinite values: replace them first.")
        low, high = min(low, float(band.min())), max(high, float(band.max()))
    return low, high


#: What :meth:`Segmenter.segment` takes that a tile-by-tile run cannot, and why.
NOT_TILED = {
    "foreground": "a foreground map is fused with the scores of the whole image",
    "maps": "a tile-by-tile run writes labels only (maps=False)",
}


#: What teaches a tile-by-tile run with the statistics of the whole image (see :func:`image_statistics_steps`).
TAUGHT_WITH = ("lesson", "exemplars")
#: What a tile-by-tile run takes besides options: those above, strokes on the image (their exemplars gathered in
#: that pass too) and objects (classified over all their tiles).
TILED_INPUTS = TAUGHT_WITH + ("strokes", "objects")


def check_tiled_keywords(keywords: dict) -> None:
    """Refuse what a tile-by-tile run cannot take, with why, rather than as an unknown option."""
    for name, why in NOT_TILED.items():
        value = keywords.get(name)
        if value is not None and value is not False:
            raise InvalidOptionError(f"segment_tiled() cannot take {name}=: {why}. Use segment() on the image (or on "
                                     f"a reduced copy of it), or leave {name} out.")


def resolve_tiled_options(segmenter, options, keywords: dict) -> SegmentOptions:
    """The run's options at native resolution; settings that cannot be tiled are refused."""
    check_tiled_keywords(keywords)
    keywords = {name: value for name, value in keywords.items()
                if name not in NOT_TILED and name not in TILED_INPUTS and name != "scribbles"}
    built = SegmentOptions.build(options, **keywords)
    if built.short_side is not DEFAULT and built.short_side is not None:
        raise InvalidOptionError(f"short_side={built.short_side!r}: large images are segmented tile by tile at their "
                                 "native resolution (short_side=None); resize the image first to segment it smaller.")
    if segmenter.method == "clipdiy":
        raise InvalidOptionError("CLIP-DIY classifies crops of the whole image squashed to 256 x 256: it cannot be "
                                 "run tile by tile. Use segment() on a reduced image, or another method.")
    opts = segmenter.resolve_options(built.replace(short_side=None))
    if opts.crop >= 1 << 20:
        raise InvalidOptionError("A whole-image window cannot be tiled: choose a crop size (e.g. preset='demo').")
    return opts


def _open_output(out, shape: tuple[int, int], dtype: np.dtype, tile: int, fingerprint: str, attrs: dict | None = None,
                 replace: bool = False):
    """(array to write, done-tiles record or None, finish callable or None, the store's group or None) for
    ``out``."""
    if out is None:
        return np.zeros(shape, dtype), None, None, None
    if not isinstance(out, (str, os.PathLike)):
        if tuple(out.shape) != shape:
            raise InvalidOptionError(f"out has shape {tuple(out.shape)}, not the image's {shape}.")
        if getattr(out, "read_only", False) or not getattr(getattr(out, "flags", None), "writeable", True):
            where = f"the zarr array at {out.store_path}" if hasattr(out, "store_path") else "out"
            raise OutputError(f"The labels cannot be written into {where}: it is read-only. Open it for writing "
                              "(zarr: mode='r+' or 'a'), or give a path (out='labels.zarr') to write a new store.")
        return out, None, None, None
    import zarr

    final = Path(out).expanduser()
    if final.exists() and not replace:
        raise OutputError(f"{final} exists: choose another path, or remove it first (it is never overwritten).")
    partial = final.with_name(final.name + ".partial")
    try:
        if partial.is_dir():
            try:
                existing = zarr.open_group(str(partial), mode="r+")
                if existing.attrs.get("fingerprint") == fingerprint:
                    return existing["labels"], existing["done"], _finisher(partial, final), existing
            except Exception:
                pass
            shutil.rmtree(partial)  # another run's, or damaged: start again
        group = zarr.open_group(str(partial), mode="w")
        group.attrs.update({**(attrs or {}), "fingerprint": fingerprint})
        labels = group.create_array("labels", shape=shape, chunks=(min(tile, shape[0]), min(tile, shape[1])),
                                    dtype=dtype, fill_value=0)
        done = group.create_array("done", shape=(math.ceil(shape[0] / tile), math.ceil(shape[1] / tile)),
                                  dtype=bool, fill_value=False)
    except OSError as exc:
        raise OutputError(f"Cannot write the labels store {final}: {exc}") from None
    return labels, done, _finisher(partial, final), group


def _finisher(partial: Path, final: Path):
    """Put the finished store in place; an older one (``replace``) is moved aside first and removed after."""
    def finish():
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            os.replace(final, old)
        os.replace(partial, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return finish


def image_statistics_steps(segmenter, image, classes: str | Sequence[str], opts: SegmentOptions, collector=None):
    """Generator: the patch statistics of a whole image too large to hold, as a run on all of it gathers them (its
    patch mean and covariance, and what each window position adds): every window of the whole image, in the
    batches that run encodes them in, each batch cut from the rows and columns it spans, read from ``image`` then.
    Yields ``Progress("statistics", windows done, windows)``; returns a :class:`~napari_clearclip.strokes.FeatureStats`.

    A lesson compares patches in the whitening of the image it teaches and scales its bonus by that image's
    text-score spread: given these, each region of a tile-by-tile run is taught as the whole image is. ``opts``:
    the run's resolved options at native resolution (fixed contrast limits for images other than uint8).
    ``collector`` (an :class:`~napari_clearclip.strokes.ExemplarCollector` of strokes on this image) gathers the
    exemplars under them from the same features, as a run on the whole image gathers them."""
    from .image import prepare
    from .prompts import check_templates, parse_classes
    from .strokes import FeatureStats
    from .windows import WindowGrid

    height, width = check_lazy_image(image)
    _, method_fn = segmenter._method_for({})
    if getattr(method_fn, "needs_text", False):  # features that depend on the classes (ResCLIP)
        queries = [s for c in parse_classes(classes) for s in c.synonyms]
        templates = check_templates(opts.templates)
        for done, total in segmenter.text.encode_steps(queries, templates):
            yield Progress("text", done, total)
        method_fn, _ = segmenter._bind_text(method_fn, segmenter.text.embeddings(queries, templates).to(
            segmenter.device), opts)
    model = segmenter.model
    grid = WindowGrid(height, width, opts.crop, opts.stride, model.patch_size)
    windows = grid.windows
    at_once = segmenter._batch_size(grid)
    stats = FeatureStats()
    yield Progress("statistics", 0, len(windows))
    for start in range(0, len(windows), at_once):
        batch = windows[start : start + at_once]
        top, bottom = min(w[0] for w in batch), max(w[1] for w in batch)
        left, right = min(w[2] for w in batch), max(w[3] for w in batch)
        pixels = prepare(np.asarray(image[top:bottom, left:right]), model.mean, model.std, None, opts.contrast_limits)
        crops = grid.crop_batch(pixels, [(y1 - top, y2 - top, x1 - left, x2 - left) for y1, y2, x1, x2 in batch])
        features = segmenter._encode_crops(crops.to(segmenter.device), method_fn)
        stats.add(grid, batch, features)
        if collector is not None:
            collector.add(grid, batch, features)
        del pixels, crops, features
        yield Progress("statistics", start + len(batch), len(windows))
    return stats


def _taught_identity(exemplars) -> str:
    """A digest of what teaches a run (for the record a partial store keeps of the run it belongs to)."""
    import hashlib

    digest = hashlib.sha256()
    for piece in exemplars._pieces():
        for values in (piece.features, piece.classes, piece.covariance, piece.offsets, piece.unsnapped_offsets):
            digest.update(b"-" if values is None else values.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def segment_tiled_steps(segmenter, image, classes: str | Sequence[str], options: SegmentOptions | Mapping | None = None,
                        *, out=None, tile: int = DEFAULT_TILE, attrs: dict | None = None, replace: bool = False,
                        on_complete=None, absent_chunks: str = "error", lesson=None, exemplars=None, strokes=None,
                        objects=None, **keywords) -> Generator[Progress, None, object]:
    """Generator: segment a large array-like image tile by tile; yields progress per tile, returns the labels.

    ``out``: None (a NumPy array of the smallest unsigned type the classes fit), an array of the
    image's height and width to write into (e.g. a zarr array), or a path where a zarr store is
    written (group with a ``labels`` array, chunks of ``tile``, and ``attrs``), renamed into place when
    complete, after ``on_complete(labels)`` (e.g. writing a table beside it); an existing store is
    replaced only with ``replace=True``. The stop of a partial store's run is where the same run resumes.
    A zarr image whose store lacks chunks is refused unless ``absent_chunks="fill"`` (see
    :func:`~napari_clearclip.zarr_images.check_absent_chunks`).

    ``lesson`` (or ``exemplars`` from other images) teaches every tile with the statistics of the whole image,
    gathered first in a pass over all of it (:func:`image_statistics_steps`: the image is encoded once more), so
    that the labels equal a run on the whole image with the lesson. ``strokes`` on the image itself (an
    array-like of its height and width: 0 = no hint, k = class k; read in bands of rows, then only the part that
    holds every painted pixel; or :func:`painted_parts` of them, read already) teach it as
    :meth:`~napari_clearclip.segmenter.Segmenter.segment` does: their exemplars are gathered in that same pass, and
    the painted pixels keep their class.

    ``objects`` (an array-like of the image's height and width holding instance ids, 0 = no object; read a tile
    at a time) gives each object the class whose probability summed over all its pixels, in every tile it
    crosses, is highest, as :meth:`~napari_clearclip.segmenter.Segmenter.segment` does: the tiles' sums are added
    up, then a second pass writes each object's class into its pixels (0 outside every object). Returns
    ``(labels, objects table)`` and calls ``on_complete(labels, table)``. A stopped run into a store resumes from
    the sums of its finished tiles (each kept with a digest of its objects: a tile whose objects changed is
    computed again).
    """
    from .block_reads import with_kept_blocks
    from .lessons import check_lesson
    from .objects import ObjectSums, check_lazy_objects
    from .prompts import parse_classes
    from .segmenter import _check_exemplars, _renamed_strokes
    from .strokes import Exemplars, ExemplarCollector
    from .zarr_images import check_absent_chunks

    strokes = _renamed_strokes(strokes, keywords)
    parsed = parse_classes(classes)
    height, width = check_lazy_image(image)
    check_absent_chunks(image, None, absent_chunks)
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 16:
        raise InvalidOptionError(f"tile={tile!r} must be a whole number of pixels, at least 16.")
    opts = resolve_tiled_options(segmenter, options, keywords)
    objects = check_lazy_objects(objects, (height, width))
    painted = strokes if isinstance(strokes, PaintedParts) or strokes is None else painted_parts(
        strokes, (height, width), len(parsed), opts.crop)
    exemplars = _check_exemplars(exemplars)
    lesson = check_lesson(lesson)
    if lesson is not None:  # checked against the run (classes, model, method, windows) before any pixel is read
        exemplars = Exemplars.combine([lesson.exemplars_for(segmenter, parsed, opts, segmenter.method), exemplars])
    if exemplars is not None and exemplars.n_classes != len(parsed):
        raise InvalidOptionError(f"The exemplars are for {exemplars.n_classes} classes, not {len(parsed)}.")
    image = with_kept_blocks(image, tile)   # a chunk larger than a tile is computed once, not once per region
    objects = None if objects is None else with_kept_blocks(objects, tile)
    if opts.contrast_limits is None and np.dtype(image.dtype) != np.uint8:
        opts = opts.replace(contrast_limits=_value_range(image, height, max(1, tile)))
    reach = max(opts.pamr_dilations) * (opts.pamr_iterations + 1) if opts.refine == "pamr" and opts.pamr_iterations else 0
    halo = opts.crop + reach
    plan = tile_plan(height, width, tile, halo, opts.stride)
    fingerprint = repr((segmenter.model.cache_id, segmenter.method, [c.synonyms for c in parsed], opts.to_dict(),
                        (height, width), str(image.dtype), tile)
                       + (() if exemplars is None else (_taught_identity(exemplars),))
                       + (() if painted is None else (painted.digest,))
                       + (() if objects is None else ("objects",)))
    target, done, finish, group = _open_output(out, (height, width), label_dtype(len(parsed)), tile, fingerprint,
                                               attrs, replace)
    tiles = len(plan)
    # one progress bar: the lesson's statistics pass (a share as large as the tiles'), the tiles, and with objects
    # the share of one tile for writing their classes (reading ids and writing labels: no model)
    shift = tiles if exemplars is not None or painted is not None else 0
    planes = shift + tiles + (1 if objects is not None else 0)
    statistics = collector = None
    if shift and not (done is not None and bool(np.all(done[...]))):
        collector = None if painted is None else ExemplarCollector(None, len(parsed), parts=painted.parts)
        steps = image_statistics_steps(segmenter, image, classes, opts, collector)
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                statistics = stop.value
                break
            what = "the lesson" if painted is None else "the strokes" if exemplars is None else "the lesson and strokes"
            yield with_fields(step, plane=0, planes=planes // shift if planes % shift == 0 else planes / shift,
                              detail=f"reading the whole image for {what}: windows {step.done}/{step.total}"
                              if step.stage == "statistics" else f"for {what}: {step.message}")
        if collector is not None:  # taught as segment() teaches: the given exemplars, then the strokes'
            exemplars = Exemplars.combine([exemplars, collector.result(segmenter.device)])

    def tiles_done(count: int) -> Progress:
        return Progress("tiles", shift + count, planes, detail=f"tiles: {count}/{tiles}")

    sums = None if objects is None else ObjectSums(len(parsed))
    kept_sums = None if objects is None or group is None else _KeptSums(group)
    yield tiles_done(0)
    for number, ((ty0, ty1, tx0, tx1), (ry0, ry1, rx0, rx1)) in enumerate(plan):
        cell = (ty0 // tile, tx0 // tile)
        region_objects = None
        if objects is not None:
            block, digest = _objects_block(objects, ty0, ty1, tx0, tx1)
            if done is not None and bool(done[cell]):
                kept = kept_sums.get(cell, digest)
                if kept is not None:
                    sums.add(*kept)
                    yield tiles_done(number + 1)
                    continue
            region_objects = np.zeros((ry1 - ry0, rx1 - rx0), block.dtype)  # the tile's objects alone are counted
            region_objects[ty0 - ry0 : ty1 - ry0, tx0 - rx0 : tx1 - rx0] = block
        elif done is not None and bool(done[cell]):
            yield tiles_done(number + 1)
            continue
        region = np.asarray(image[ry0:ry1, rx0:rx1])
        steps = segmenter.segment_steps(region, classes, opts, maps=False, remember=False, exemplars=exemplars,
                                        image_statistics=statistics, objects=region_objects)
        while True:  # the tile's own progress, as a share of the whole: a stop takes effect within a tile
            try:
                step = next(steps)
            except StopIteration as stop:
                result = stop.value
                break
            if isinstance(step, Progress):
                yield with_fields(step, plane=shift + number, planes=planes,
                                  detail=f"tile {number + 1}/{tiles}: {step.message}")
        if objects is None:
            labels = result.labels[ty0 - ry0 : ty1 - ry0, tx0 - rx0 : tx1 - rx0]
            if painted is not None:  # what the user painted is what they get
                labels = painted.pasted(labels, ty0, tx0)
            target[ty0:ty1, tx0:tx1] = labels.astype(target.dtype)
        else:
            sums.add(*result.object_sums)
            if kept_sums is not None:
                kept_sums.put(cell, digest, result.object_sums)
        del region, result, steps, region_objects
        if done is not None:
            done[cell] = True
        yield tiles_done(number + 1)
    table = None
    if objects is not None:  # every object's sums are whole: its class goes into its pixels, tile by tile
        table, object_classes = sums.classes([c.name for c in parsed])
        for number, ((ty0, ty1, tx0, tx1), _) in enumerate(plan):
            block, _ = _objects_block(objects, ty0, ty1, tx0, tx1, digest=False)
            target[ty0:ty1, tx0:tx1] = object_classes(block).astype(target.dtype)
            yield Progress("objects", number + 1, tiles, plane=shift + tiles, planes=planes,
                           detail=f"giving each object its class: tile {number + 1}/{tiles}")
    if on_complete is not None:
        on_complete(target) if objects is None else on_complete(target, table)
    if finish is not None:
        finish()
        import zarr

        target = zarr.open_group(str(Path(out).expanduser()), mode="r+")["labels"]
    return target if objects is None else (target, table)


#: Side of the cells in which painted pixels are first found (a band of rows at a time), in image pixels.
PAINT_CELL = 64


@dataclass
class PaintedParts:
    """The strokes on an image too large to hold, as parts of it: each holds the painted pixels of one cluster of
    them (strokes closer than a window to one another), the window's width around them, and its strokes numbered
    as on the whole image (each connected piece of one class, in the raster order of their first pixels). A window
    over a painted pixel lies inside the part that holds it and holds no other part's painted pixel."""

    parts: list  # [(origin (top, left), strokes (int32, only this part's painted pixels), pieces (int32))]
    digest: str  # of every part (for the record a partial store keeps of its run)

    def pasted(self, labels: np.ndarray, top: int, left: int) -> np.ndarray:
        """``labels`` (a block of the image from ``top``, ``left``) with the painted pixels given their class."""
        from .strokes import paste_strokes

        copied = False
        for (y, x), strokes, _ in self.parts:
            y0, x0 = top - y, left - x
            rows = slice(max(y0, 0), max(min(y0 + labels.shape[0], strokes.shape[0]), 0))
            cols = slice(max(x0, 0), max(min(x0 + labels.shape[1], strokes.shape[1]), 0))
            part = strokes[rows, cols]
            if not part.size or not part.any():
                continue
            if not copied:
                labels, copied = np.array(labels, copy=True), True
            paste_strokes(labels[rows.start - y0 : rows.stop - y0, cols.start - x0 : cols.stop - x0], part)
        return labels


def painted_parts(strokes, shape: tuple[int, int], n_classes: int, crop: int) -> PaintedParts | None:
    """The :class:`PaintedParts` of ``strokes`` (an array-like of the image's ``shape``: 0 = no hint, k = class k),
    read a band of rows at a time and checked as :func:`~napari_clearclip.strokes.check_strokes` checks them;
    None where nothing is painted. ``crop``: the side of the run's windows."""
    import hashlib

    from scipy import ndimage
    from skimage.measure import label

    dtype, given = np.dtype(getattr(strokes, "dtype", np.asarray(strokes).dtype)), tuple(np.shape(strokes))
    if dtype.kind not in "ui":
        raise InvalidOptionError(f"strokes must be an integer array (0 = no hint, k = class k), not {dtype}: "
                                 "e.g. the data of a napari Labels layer.")
    if given != tuple(shape):
        raise InvalidOptionError(f"strokes of shape {given} do not match the image's {tuple(shape)}.")
    cell = PAINT_CELL
    cells = np.zeros((-(-shape[0] // cell), -(-shape[1] // cell)), bool)
    low = high = 0
    band_rows = cell * 32
    for start in range(0, shape[0], band_rows):
        band = np.asarray(strokes[start : start + band_rows])
        painted_rows = np.flatnonzero(band.any(axis=1))
        if not len(painted_rows):
            continue
        values = band[painted_rows]
        low, high = min(low, int(values.min())), max(high, int(values.max()))
        ys, xs = np.nonzero(band)
        cells[(start + ys) // cell, xs // cell] = True
    if low < 0 or high > n_classes:
        raise InvalidOptionError(f"strokes hold values {low}..{high}, but only 0 (no hint) to {n_classes} (one per "
                                 "class) are meaningful.")
    if not cells.any():
        return None
    # clusters: cells of paint within a window (and a cell) of one another
    reach = -(-crop // cell) + 1
    clusters, count = ndimage.label(ndimage.binary_dilation(cells, np.ones((2 * reach + 1,) * 2, bool)),
                                    np.ones((3, 3), bool))
    boxes = ndimage.find_objects(np.where(cells, clusters, 0), count)
    parts, firsts = [], []
    for number, box in enumerate(boxes, start=1):
        if box is None:
            continue
        y0, y1 = max(0, box[0].start * cell - crop), min(shape[0], box[0].stop * cell + crop)
        x0, x1 = max(0, box[1].start * cell - crop), min(shape[1], box[1].stop * cell + crop)
        part = np.asarray(strokes[y0:y1, x0:x1]).astype(np.int32)
        cy, cx = y0 // cell, x0 // cell
        mine = (cells & (clusters == number))[cy : -(-y1 // cell), cx : -(-x1 // cell)]
        own = np.repeat(np.repeat(mine, cell, 0), cell, 1)[y0 - cy * cell : y1 - cy * cell, x0 - cx * cell : x1 - cx * cell]
        part[~own] = 0                                  # another cluster's paint inside this one's box
        pieces = label(part, background=0, connectivity=2)
        flat = pieces.ravel()
        at = np.flatnonzero(flat)
        ids, first = np.unique(flat[at], return_index=True)   # each piece's first pixel, in raster order
        firsts.append((y0 + at[first] // part.shape[1], x0 + at[first] % part.shape[1], ids))
        parts.append(((y0, x0), part, pieces))
    # numbered in the raster order of their first pixels over the whole image, as a run on all of it numbers them
    rows = np.concatenate([f[0] for f in firsts])
    cols = np.concatenate([f[1] for f in firsts])
    order = np.empty(len(rows), np.int64)
    order[np.lexsort((cols, rows))] = np.arange(1, len(rows) + 1)
    digest = hashlib.blake2b(digest_size=16)
    done, numbered = 0, []
    for (origin, part, pieces), (_, _, ids) in zip(parts, firsts):
        lookup = np.zeros(int(ids.max()) + 1, np.int32)
        lookup[ids] = order[done : done + len(ids)]
        done += len(ids)
        numbered.append((origin, part, lookup[pieces]))
        digest.update(repr((origin, part.shape)).encode())
        digest.update(part.data)
    return PaintedParts(numbered, digest.hexdigest())


def _objects_block(objects, ty0: int, ty1: int, tx0: int, tx1: int, digest: bool = True):
    """The object ids of one tile, read now (negative ids refused), and a digest of them (or None)."""
    import hashlib

    from .objects import checked_block

    block = checked_block(objects, slice(ty0, ty1), slice(tx0, tx1))
    if not digest:
        return block, None
    hashed = hashlib.blake2b(repr((block.shape, str(block.dtype))).encode(), digest_size=16)
    hashed.update(np.ascontiguousarray(block).data)
    return block, hashed.hexdigest()


class _KeptSums:
    """The per-object sums of a partial store's finished tiles, each with the digest of the tile's objects, so that
    a stopped run resumes from them (and a tile whose objects changed meanwhile is computed again)."""

    def __init__(self, group):
        self.group = group

    @staticmethod
    def _name(cell) -> str:
        return f"object_sums/{cell[0]}_{cell[1]}"

    def get(self, cell, digest: str):
        name = self._name(cell)
        try:
            if self.group.attrs.get(name) != digest:
                return None
            return tuple(self.group[f"{name}/{part}"][...] for part in ("ids", "sums", "area"))
        except (KeyError, ValueError, OSError):
            return None

    def put(self, cell, digest: str, parts) -> None:
        name = self._name(cell)
        for part, values in zip(("ids", "sums", "area"), parts):
            self.group.create_array(f"{name}/{part}", data=np.asarray(values), overwrite=True)
        self.group.attrs[name] = digest
