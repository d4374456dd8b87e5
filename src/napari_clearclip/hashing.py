"""Digests of pixel arrays, the keys of every cache: fast where a cache is emptied by a new version anyway.

Each run hashes its image to find what earlier runs kept of it. At 4096 x 4096 RGB that is
50 MB, on every live re-run (once: within a run, the digest of the same pixels is kept, see
:func:`digests_kept`). Two digests:

- :func:`pixel_key`, XXH3 (128 bits, the xxhash package): the features' keys, in memory and in the feature store,
  whose keys hold the package's version too, so that no store outlives the digest it was keyed by. 2-4 ms for
  those 50 MB on one core here, where SHA-256 takes 30 ms: a tenth of re-opening a stored image.
- :func:`pixel_digest`, SHA-256, which processors since about 2017-2020 compute in hardware (x86 SHA extensions,
  ARMv8 crypto): what records kept from one version to the next hold (results kept for images of no file). Large
  arrays are hashed in fixed 4 MiB chunks, on threads (hashlib lets other threads run while it hashes), and the
  chunk digests hashed together. The chunk size does not depend on the machine, so a digest made on one machine
  finds the same record on another.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash

#: Bytes per chunk; smaller arrays are hashed in one piece, as one SHA-256 digest of their bytes.
CHUNK_BYTES = 4 << 20

#: What the digest of chunk digests starts with: never the bytes of a small array of the same length.
CHUNKED = b"napari-clearclip pixels in 4 MiB chunks"

_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="clearclip-hash")
    return _pool


_kept_digests = threading.local()


@contextmanager
def digests_kept():
    """Within this block, on this thread, the digest of the same pixels (the same memory, shape, strides and type)
    is computed once: a live re-run of the widget hashes its image where it collects the strokes' exemplars and
    again where it labels (with SHA-256, 30-50 ms each at 4096 x 4096 RGB; with XXH3, 3-4 ms). For one run, whose
    image does not change while it runs; blocks may nest."""
    outermost = getattr(_kept_digests, "memo", None) is None
    if outermost:
        _kept_digests.memo = {}
    try:
        yield
    finally:
        if outermost:
            _kept_digests.memo = None


def pixel_digest(array, digest_size: int = 20) -> bytes:
    """A SHA-256 digest of the array's bytes (C order), cut to ``digest_size`` bytes; of its 4 MiB chunks' digests
    when larger (on two cores, twice as fast). Kept within :func:`digests_kept`."""
    if not 1 <= digest_size <= 32:
        raise ValueError(f"digest_size must be 1 to 32 bytes, not {digest_size}")
    return _kept(array, ("sha256", digest_size), lambda: _digest(array, digest_size))


def pixel_key(array) -> bytes:
    """The 16-byte XXH3 digest of the array's bytes (C order): the key of caches that a new version empties anyway.
    Kept within :func:`digests_kept`."""
    return _kept(array, ("xxh3",), lambda: _fast_digest(array))


def _kept(array, kind: tuple, compute) -> bytes:
    memo = getattr(_kept_digests, "memo", None)
    if memo is None or not isinstance(array, np.ndarray):
        return compute()
    key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str, kind)
    if key not in memo:  # the array is kept with its digest: its memory is not reused while the block lasts
        memo[key] = (array, compute())
    return memo[key][1]


def _fast_digest(array) -> bytes:
    return xxhash.xxh3_128(memoryview(np.ascontiguousarray(array)).cast("B")).digest()


def _digest(array, digest_size: int) -> bytes:
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    if len(data) <= CHUNK_BYTES:
        return hashlib.sha256(data).digest()[:digest_size]
    chunks = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
    digests = _threads().map(lambda chunk: hashlib.sha256(chunk).digest(), chunks)
    combined = hashlib.sha256(CHUNKED)
    combined.update(len(data).to_bytes(8, "little"))
    for digest in digests:
        combined.update(digest)
    return combined.digest()[:digest_size]


#: Blocks of a file, evenly spread, whose digest tells a copy of an image's file from another file of that name and
#: size (uncompressed images of one shape all have one size), and their length: 1 MiB read, whatever the file's size.
SAMPLED_BLOCKS, SAMPLED_BYTES = 16, 1 << 16
_SAMPLED: dict[tuple, str] = {}


def sampled_digest(path: str | Path) -> str:
    """SHA-256 of a file's size and of :data:`SAMPLED_BLOCKS` blocks spread over it (the whole file when small);
    kept for the file as long as its size and time are the same."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SAMPLED:
        if len(_SAMPLED) > 64:
            _SAMPLED.clear()
        _SAMPLED[key] = _sampled(path, stat.st_size)
    return _SAMPLED[key]


def _sampled(path: str | Path, size: int) -> str:
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as handle:
        if size <= SAMPLED_BLOCKS * SAMPLED_BYTES:
            digest.update(handle.read())
        else:
            for block in range(SAMPLED_BLOCKS):
                handle.seek((size - SAMPLED_BYTES) * block // (SAMPLED_BLOCKS - 1))
                digest.update(handle.read(SAMPLED_BYTES))
    return digest.hexdigest()
