"""Image features on disk: an image encoded once is never encoded again, in this session or the next.

One zarr store per image, named by the image's feature key: a hash of its pixels, the model
(name, weights by content, precision), the method and the window settings. The store's
attributes repeat what it was made from (and the package version) and are checked when it is
read: a store that does not match, is truncated, or is not ours is treated as missing, removed,
and said once in a warning; the next run writes it again.

A store is written into a temporary folder and renamed into place, so that a run killed while
writing (or a full disk) never leaves a store that could be read as whole. The user
cache's folder is bounded in size (2 GiB): after each write the stores read least recently are removed
first. A folder the user names (``NAPARI_CLEARCLIP_FEATURE_STORE``, ``--feature-store``, a Segmenter's folder)
is theirs: nothing in it is removed unless a bound is set (``NAPARI_CLEARCLIP_FEATURE_STORE_BYTES``), since it may
hold what a cluster spent hours encoding. The temporary folders of writers that died are removed in any folder
(at once for a process of this machine, after an hour otherwise).

Runs write in the background (:meth:`FeatureStore.save_later`): a result never waits for the
disk, and the writes still pending when the process exits normally are finished then.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "napari-clearclip features"
VERSION = 1
SUFFIX = ".zarr"
#: Default bound of the store folder in the user cache.
DEFAULT_MAX_BYTES = 2 << 30
#: The environment variables naming the store folder, and a bound in bytes for it (e.g. 500G; 0 or none: none).
ROOT_VARIABLE, BOUND_VARIABLE = "NAPARI_CLEARCLIP_FEATURE_STORE", "NAPARI_CLEARCLIP_FEATURE_STORE_BYTES"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def default_root() -> Path:
    """``features/`` in the user cache (``NAPARI_CLEARCLIP_FEATURE_STORE`` names another folder, e.g. a shared one)."""
    from .cache import cache_dir

    override = os.environ.get(ROOT_VARIABLE)
    return Path(override) if override else cache_dir() / "features"


def parse_bytes(text: str) -> int | None:
    """A size such as "500G", "2 GiB", "1048576" or "none" in bytes (None: no bound)."""
    from .errors import InvalidOptionError

    value = str(text).strip().upper().replace("IB", "").replace(" ", "")
    if value in ("", "0", "NONE"):
        return None
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS and not value[-1:].isdigit() else (value, "")
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise InvalidOptionError(f"{BOUND_VARIABLE}={text!r} is not a size: give bytes, or a number with K, M, G or "
                                 "T (e.g. 500G), or none for no bound.") from None
    return int(size) if size > 0 else None


def default_bound(root: Path | None) -> int | None:
    """The bound of a store folder when none is given: ``NAPARI_CLEARCLIP_FEATURE_STORE_BYTES`` where it is set;
    else 2 GiB for the user cache's folder, and none for a folder the user named (``root``, or the environment's)."""
    setting = os.environ.get(BOUND_VARIABLE)
    if setting is not None:
        return parse_bytes(setting)
    named = root is not None or bool(os.environ.get(ROOT_VARIABLE))
    return None if named else DEFAULT_MAX_BYTES


def _size(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() else 0
        except OSError:  # removed meanwhile by another process
            pass
    return total


#: ``FeatureStore(max_bytes=...)``'s default: the bound :func:`default_bound` gives the folder.
FOLDER_DEFAULT = "default"


class FeatureStore:
    """A folder of per-image feature stores, bounded to ``max_bytes`` (None: unbounded; by default 2 GiB for the
    user cache, none for a folder the user names: see :func:`default_bound`)."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None | str = FOLDER_DEFAULT):
        self.root = Path(root) if root is not None else default_root()
        self.max_bytes = default_bound(None if root is None else Path(root)) if max_bytes == FOLDER_DEFAULT \
            else max_bytes
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def prepare_reading(self) -> None:
        """Import zarr in the background when this folder holds stores: its import (a quarter of a second)
        then overlaps loading the model, instead of delaying the first image read from the store."""
        try:
            with os.scandir(self.root) as entries:
                if not any(entry.name.endswith(SUFFIX) for entry in entries):
                    return
        except OSError:  # no folder yet: nothing to read
            return
        import importlib

        importing = threading.Thread(target=importlib.import_module, args=("zarr",), name="zarr-import", daemon=True)
        importing.start()
        atexit.register(importing.join, 30)   # an import cut short at exit can leave its C extensions half made

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    # -- reading -----------------------------------------------------------------------------------

    def load(self, key: str, identity: dict):
        """The stored features of ``key`` as ``(grid arguments, [(windows, features)], guide)``, or None.

        ``identity`` (model, method, windows) must equal what the store was made with. ``guide`` is the
        image at the working size (what edge snapping follows) as it was saved (normalised float32, or uint8
        intensities), or None in a store without it.
        """
        self.wait(key)
        path = self.path(key)
        if not path.is_dir():  # most images: no store, and no need to import zarr
            return None
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r")
            attrs = dict(group.attrs)
            if attrs.get("format") != FORMAT:
                raise ValueError("not a napari-clearclip feature store")
            if attrs.get("version") != VERSION or attrs.get("key") != key or attrs.get("identity") != identity:
                raise ValueError("made for another image, model, method, window setting or version")
            batches = []
            for number, windows in enumerate(attrs["batches"]):
                array = np.asarray(group[f"batch_{number:05d}"][...])
                if array.shape[0] != len(windows) or not np.isfinite(array).all():
                    raise ValueError(f"batch {number} is damaged")
                dtype = getattr(torch, attrs.get("dtype") or "float32")
                batches.append(([tuple(int(v) for v in w) for w in windows], torch.from_numpy(array).to(dtype)))
            grid = attrs["grid"]
            guide = _read_guide(group, attrs)
        except Exception as exc:  # truncated, foreign or damaged: a miss, said once, and written again
            self._discard(path, f"{exc}")
            return None
        try:
            os.utime(path)  # read recently: evicted last
        except OSError:
            pass
        return grid, batches, guide

    def _discard(self, path: Path, why: str) -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(f"The stored image features in {path} cannot be used ({why}): they are computed again.",
                          RuntimeWarning, stacklevel=4)
        shutil.rmtree(path, ignore_errors=True)

    # -- writing -----------------------------------------------------------------------------------

    def save(self, key: str, identity: dict, grid: dict, batches, guide: torch.Tensor | None = None) -> Path | None:
        """Write the features of ``key`` atomically, then trim the folder to its bound; None if it could not.

        ``guide``, the image at the working size, is kept with them: a new session snaps to edges without
        reading and resizing the image again (0.03-0.08 s at 4096 x 4096, more from a lazy store). It is the
        normalised float32 image, or its whole intensities as uint8 (3, h, w), which the reader normalises.
        """
        import zarr

        path = self.path(key)
        if path.is_dir():
            return path
        nbytes = sum(int(f.numel()) * 4 for _, f in batches)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return None
        partial = self.root / f".{key}{_PARTIAL}{_HOST}-{os.getpid()}-{threading.get_ident()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            group = zarr.open_group(str(partial), mode="w")
            for number, (_, features) in enumerate(batches):
                values = features.detach().float().cpu().numpy()
                group.create_array(f"batch_{number:05d}", data=values, chunks=values.shape)
            guide_shape = None
            if guide is not None:  # whole intensities stay uint8; anything else is kept as float32
                values = guide.detach().cpu()
                values = (values if values.dtype == torch.uint8 else values.float()).numpy()
                group.create_array("guide", data=values, chunks=values.shape)
                guide_shape = list(values.shape)
            from . import __version__

            # the attributes go last: a store without them is incomplete, and never renamed into place
            dtype = str(batches[0][1].dtype).replace("torch.", "") if batches else ""
            group.attrs.update({"format": FORMAT, "version": VERSION, "key": key, "identity": identity,
                                "grid": grid, "dtype": dtype, "batches": [[list(w) for w in windows] for windows, _ in batches],
                                "guide": guide_shape,
                                "made_with": __version__, "written": time.time()})
            os.replace(partial, path)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if path.is_dir():  # another process stored the same image meanwhile
                return path
            log.warning("Could not store image features in %s: %s", self.root, exc)  # disk full, no permission
            return None
        self.trim()
        return path

    def save_later(self, key: str, identity: dict, grid: dict, batches, guide: torch.Tensor | None = None) -> None:
        """Write the features of ``key`` in the background: the run goes on at once.

        Reading ``key`` (from any store object in this process) waits for its write; :meth:`flush`
        waits for all of them.
        """
        global _WRITER
        path = self.path(key)
        with _GUARD:
            if path in _PENDING:
                return
            _PENDING[path] = threading.Event()
            if _WRITER is None:
                _register_exit_hook()
            if _WRITER is None or not _WRITER.is_alive():
                _WRITER = threading.Thread(target=_write_pending, name="feature-store-writer", daemon=True)
                _WRITER.start()
        _QUEUE.put((self, key, identity, grid, list(batches), guide))

    def holds(self, key: str) -> bool:
        """Whether the features of ``key`` are stored, or being written by this process (without reading them)."""
        with _GUARD:
            if self.path(key) in _PENDING:
                return True
        return self.path(key).is_dir()

    def wait(self, key: str) -> None:
        """Wait until a background write of ``key`` is done (at once when there is none)."""
        with _GUARD:
            event = _PENDING.get(self.path(key))
        if event is not None:
            event.wait()

    @staticmethod
    def flush() -> None:
        """Wait until every background write of this process is on disk (or given up)."""
        if _WRITER is not None and _WRITER.is_alive():
            _QUEUE.join()

    def trim(self) -> None:
        """Remove the least recently used stores until the folder is within its bound (and stale partial ones)."""
        with self._lock:
            if not self.root.is_dir():
                return
            stores = []
            for entry in self.root.iterdir():
                try:  # other processes sharing the folder rename and remove entries meanwhile
                    if entry.name.startswith(".") and _PARTIAL in entry.name:
                        if _writer_died(entry.name) or time.time() - entry.stat().st_mtime > 3600:
                            shutil.rmtree(entry, ignore_errors=True)
                        continue
                    if self.max_bytes is not None and entry.is_dir() and entry.name.endswith(SUFFIX):
                        stores.append((entry.stat().st_mtime, _size(entry), entry))
                except OSError:
                    continue
            # (a folder of the user's, unbounded, has no stores listed: only dead writers' folders go)
            total = sum(size for _, size, _ in stores)
            for _, size, entry in sorted(stores):
                if total <= self.max_bytes:
                    break
                shutil.rmtree(entry, ignore_errors=True)
                total -= size



def filled_share(store: FeatureStore) -> float:
    """How full a bounded store folder is (its stores' bytes over its bound; 0 for an unbounded one)."""
    if store.max_bytes is None or not store.root.is_dir():
        return 0.0
    total = sum(_size(entry) for entry in store.root.iterdir() if entry.name.endswith(SUFFIX) and entry.is_dir())
    return total / store.max_bytes


_PARTIAL = ".partial-"
_HOST = socket.gethostname().replace("-", "_")


def _writer_died(name: str) -> bool:
    """Whether the partial store ``name`` was being written by a process of this machine that no longer runs
    (killed, e.g. by the out-of-memory killer): it can be removed at once, not an hour later."""
    host, _, rest = name.partition(_PARTIAL)[2].partition("-")
    pid = rest.partition("-")[0]
    if host != _HOST or not pid.isdigit() or os.name == "nt":  # os.kill(pid, 0) would stop a process on Windows
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # running, as another user
        return False
    return False


# One writer thread per process, for every store: writes are sequential, so a run's disk traffic
# never competes with itself, and reading a store waits only for that store's own write.
_QUEUE: queue.Queue = queue.Queue()
_PENDING: dict[Path, threading.Event] = {}
_GUARD = threading.Lock()
def _read_guide(group, attrs: dict) -> torch.Tensor | None:
    """The stored guide image (3, h, w), float32 or uint8, None when the store has none; a damaged one raises
    ValueError."""
    shape = attrs.get("guide")
    if shape is None:
        return None
    array = np.asarray(group["guide"][...])
    if (list(array.shape) != list(shape) or array.ndim != 3 or array.shape[0] != 3
            or array.dtype not in (np.float32, np.uint8) or not np.isfinite(array).all()):
        raise ValueError("the stored guide image is damaged")
    return torch.from_numpy(array)


_WRITER: threading.Thread | None = None


def _write_pending() -> None:
    while True:
        store, key, identity, grid, batches, guide = _QUEUE.get()
        try:
            store.save(key, identity, grid, batches, guide)
        except Exception as exc:  # never let one store stop the writer; the image is encoded again next time
            log.warning("Could not store image features in %s: %s", store.root, exc)
        finally:
            with _GUARD:
                _PENDING.pop(store.path(key)).set()
            _QUEUE.task_done()


def _register_exit_hook() -> None:
    """Finish pending writes at exit, before the thread pools that zarr writes through refuse work.

    Those pools stop in the threading module's exit hooks, which run before :mod:`atexit`'s and
    last-registered first: the hook goes there, after the pools' own (where Python has that hook).
    """
    import concurrent.futures.thread  # noqa: F401  (registers the pools' hook first)

    register = getattr(threading, "_register_atexit", None)
    try:
        (register or atexit.register)(_finish_writes)
    except RuntimeError:  # the interpreter is already shutting down
        pass


#: Seconds the process waits at exit for features still being written (see shorten_exit_wait).
EXIT_WAIT = 120.0
_exit_wait = [EXIT_WAIT]


def shorten_exit_wait(seconds: float) -> None:
    """Wait at most ``seconds`` at exit for features still being written: after a Ctrl+C, the user wants the process
    to end, and a store left unfinished is only a cache entry that is never read (it is removed later)."""
    _exit_wait[0] = min(_exit_wait[0], float(seconds))


def _finish_writes(timeout: float | None = None) -> None:
    """Pending writes finish when the process exits normally, within ``timeout`` seconds (default: the exit wait,
    which a Ctrl+C shortens even while this waits; a write that does not finish leaves only a partial folder, which
    is never read and is removed later).

    A Ctrl+C while waiting (a second one, after the first stopped a batch run) ends the wait
    quietly: the process exits at once, without a traceback.
    """
    start = time.monotonic()
    try:
        while True:
            with _GUARD:
                events = list(_PENDING.values())
            deadline = start + (_exit_wait[0] if timeout is None else timeout)
            if not events or time.monotonic() > deadline:
                return
            events[0].wait(min(0.2, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        return
