"""The stores kept in the user cache's ``labels`` folder, and when they go.

Results segmented tile by tile (``<image>-<time>.zarr``) and working copies of labels too large to hold
(``<name>-edits-<time>.zarr``) are the plugin's, not the user's files, yet they hold corrections: a result left when
napari closed teaches the next run on its image, and a working copy's strokes come back when its store is opened
again. What can no longer come back goes, so that the cache does not grow with every slide:

- a result whose layer the user removed (discarded, :func:`discard_result`), at once;
- a working copy whose strokes were all saved, once its store is gone or written again (nothing opens it then);
- after :data:`KEEP_UNUSED_DAYS` without a write: a result no napari shows (its image's file may never be segmented
  again, or it had none), a working copy of a store gone or written again, and anything there that cannot be read;
- a run's unfinished store (``.partial``: napari killed during the run) after a day without a write, and a folder
  left by a removal cut short (no metadata) after an hour.

Only folders named as this cache names its stores, inside the ``labels`` folder, are ever removed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Iterable

_log = logging.getLogger(__name__)

#: Days a store no napari uses is kept without a write before it is removed (see the module's text).
KEEP_UNUSED_DAYS = 30
#: Seconds without a write after which a run's unfinished store is taken for one whose run was killed.
PARTIAL_AFTER_SECONDS = 24 * 3600
#: What a discarded result's record says: no run learns from it, whatever is left of its files.
DISCARDED = "discarded"


def labels_folder() -> Path:
    """The user cache's folder of results segmented tile by tile and working copies."""
    from .cache import cache_dir

    return cache_dir() / "labels"


#: The names this cache gives its stores: ``<name>-<date>-<time>[-n].zarr`` (``<name>-edits-...`` for working
#: copies), and ``.partial`` while a run writes one. Nothing named otherwise is removed, even in the ``labels``
#: folder (a cache folder set to a shared place may hold a user's own stores).
STORE_NAME = re.compile(r".+-\d{8}-\d{6}(-\d+)?\.zarr(\.partial)?")


def in_labels_folder(path: str | Path) -> bool:
    """Whether ``path`` is a store of this cache (directly inside :func:`labels_folder`, named as this cache names
    its stores): nothing else is removed."""
    path = Path(path)
    try:
        return path.resolve().parent == labels_folder().resolve() and STORE_NAME.fullmatch(path.name) is not None
    except OSError:
        return False


def _attributes(path: Path) -> dict | None:
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        return attrs if isinstance(attrs, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def last_written(path: Path) -> float:
    """When anything in a store was last written (its newest file or folder; 0 when it cannot be read)."""
    try:
        newest = path.stat().st_mtime
        for item in path.rglob("*"):
            newest = max(newest, item.stat().st_mtime)
        return newest
    except OSError:
        return 0.0


def remove_stores(paths: Iterable[str | Path]) -> None:
    """Remove stores of this cache (others are left alone), whatever is in them."""
    for path in paths:
        if in_labels_folder(path):
            try:   # its metadata first: a store cut short by napari's exit is read by nothing (and goes next time)
                (Path(path) / "zarr.json").unlink()
            except OSError:
                pass
            shutil.rmtree(path, ignore_errors=True)


def remove_in_background(paths: Iterable[str | Path]) -> threading.Thread | None:
    """:func:`remove_stores` in a thread (a slide's store has thousands of files); None when there is nothing to do."""
    paths = [Path(path) for path in paths]
    if not paths:
        return None
    thread = threading.Thread(target=remove_stores, args=(paths,), name="napari-clearclip removing results",
                              daemon=True)
    thread.start()
    return thread


def discard_result(store: str | Path) -> bool:
    """Mark a result segmented tile by tile discarded (its layer was removed): no run learns from it, even should
    napari close before its files are all removed. Returns whether it was marked (False for a store that is not a
    result of this cache)."""
    from .tiled_edits import RESULT_RECORD_KEY

    path = Path(store)
    if not in_labels_folder(path):
        return False
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r+")
        record = dict(group.attrs.get(RESULT_RECORD_KEY) or {})
        record[DISCARDED] = True
        group.attrs[RESULT_RECORD_KEY] = record
        return True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _log.info("The result %s could not be marked discarded (%s); it is removed.", path, exc)
        return True


def discarded_results(folder: str | Path | None = None) -> list[Path]:
    """The results of the ``labels`` folder marked discarded (:func:`discard_result`) and not removed yet (a run was
    going when their layer was removed, or napari closed during their removal)."""
    from .tiled_edits import RESULT_RECORD_KEY

    folder = Path(folder) if folder is not None else labels_folder()
    found = []
    for path in sorted(folder.glob("*.zarr")) if folder.is_dir() else []:
        record = (_attributes(path) or {}).get(RESULT_RECORD_KEY)
        if isinstance(record, dict) and record.get(DISCARDED):
            found.append(path)
    return found


def stale_stores(shown: Iterable[str | Path] = (), days: float = KEEP_UNUSED_DAYS, now: float | None = None,
                 folder: str | Path | None = None) -> list[Path]:
    """The stores of the ``labels`` folder that can go (see the module's text), leaving those in ``shown`` (stores
    layers show), the working copies open in this process and the results of this napari (their layers, removed
    or not, are the widget's to judge)."""
    from .editable_copy import _IN_USE

    folder = Path(folder) if folder is not None else labels_folder()
    now = time.time() if now is None else now
    shown = {str(Path(path)) for path in shown} | _working_copies_in_use(_IN_USE)
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError as exc:   # (a cache folder that cannot be listed: nothing to tidy)
        _log.info("The cache folder %s cannot be read (%s): nothing in it is removed.", folder, exc)
        return []
    stale = []
    for path in entries:
        try:
            if (str(path) not in shown and STORE_NAME.fullmatch(path.name) and path.is_dir()
                    and _stale(path, now, now - days * 86400)):
                stale.append(path)
        except OSError:   # (one that cannot be read now is left for next time)
            continue
    return stale


def _stale(path: Path, now: float, unused_since: float) -> bool:
    """Whether a folder of the ``labels`` folder can go (see :func:`stale_stores`)."""
    from .editable_copy import WORKING_KEY, store_state
    from .tiled_edits import RESULT_RECORD_KEY, SESSION

    if path.name.endswith(".zarr.partial"):
        return last_written(path) < now - PARTIAL_AFTER_SECONDS
    if not path.name.endswith(".zarr"):
        return False
    if not (path / "zarr.json").exists():   # no store (one cut short in its removal): nothing reads it
        return last_written(path) < now - PARTIAL_AFTER_SECONDS / 24
    attrs = _attributes(path) or {}
    result, working = attrs.get(RESULT_RECORD_KEY), attrs.get(WORKING_KEY)
    if isinstance(result, dict):
        return bool(result.get(DISCARDED)) or (result.get("session") != SESSION and last_written(path) < unused_since)
    if isinstance(working, dict):   # its store not found (deleted, moved, on a disk not connected) or written again
        source = working.get("source")
        gone = not source or not Path(str(source)).exists() or store_state(source) != working.get("state")
        return gone and (bool(working.get("saved")) or last_written(path) < unused_since)
    return last_written(path) < unused_since   # unreadable, or from a version that recorded nothing


def _working_copies_in_use(in_use) -> set[str]:
    """The paths of the working copies open in this process (a weak mapping another thread may change meanwhile)."""
    while True:
        try:
            return set(in_use.keys())
        except RuntimeError:   # changed during the copy: again
            continue
