"""Where caches live, and a small in-memory LRU bounded by bytes."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import platformdirs

CACHE_ENV = "NAPARI_CLEARCLIP_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache directory, overridable with ``NAPARI_CLEARCLIP_CACHE_DIR``."""
    override = os.environ.get(CACHE_ENV)
    path = Path(override) if override else Path(platformdirs.user_cache_dir("napari-clearclip"))
    return path


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, memoised on (path, size, mtime).

    Local checkpoints are keyed by content so that a renamed or copied file
    reuses its cached text embeddings and an overwritten one does not.
    """
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


class ByteLRU:
    """A least-recently-used mapping that evicts once its entries exceed ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()  # a Segmenter may be shared by threads

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._total -= self._items.pop(key)[1]
            self._items[key] = (value, nbytes)
            self._total += nbytes
            while self._total > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._total -= size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items
