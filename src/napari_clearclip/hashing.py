"""Digests of pixel arrays, the keys of every cache: computed on several cores for large images.

Each run hashes its image to find what earlier runs kept of it. At 4096 x 4096 RGB that is
50 MB, about 50 ms on one core, on every live re-run (once: within a run, the digest of the same
pixels is kept, see :func:`digests_kept`).
Large arrays are hashed in fixed 4 MiB chunks, on threads (hashlib lets other threads run while it
hashes), and the chunk digests hashed together. The chunk size does not depend on the machine, so a
digest made on a cluster finds the same features on a laptop.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

#: Bytes per chunk; smaller arrays are hashed in one piece, as one blake2b digest of their bytes.
CHUNK_BYTES = 4 << 20

_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="clearclip-hash")
    return _pool


_kept = threading.local()


@contextmanager
def digests_kept():
    """Within this block, on this thread, the digest of the same pixels (the same memory, shape, strides and type)
    is computed once: a live re-run of the widget hashes its image where it collects the strokes' exemplars and
    again where it labels (30-50 ms each at 4096 x 4096 RGB). For one run, whose image does not change while it
    runs; blocks may nest."""
    outermost = getattr(_kept, "memo", None) is None
    if outermost:
        _kept.memo = {}
    try:
        yield
    finally:
        if outermost:
            _kept.memo = None


def pixel_digest(array, digest_size: int = 20) -> bytes:
    """A blake2b digest of the array's bytes (C order); of its 4 MiB chunks' digests when larger (2x faster on
    two cores, 57 against 30 ms for 4096 x 4096 RGB). Kept within :func:`digests_kept`."""
    memo = getattr(_kept, "memo", None)
    if memo is None or not isinstance(array, np.ndarray):
        return _digest(array, digest_size)
    key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str, digest_size)
    if key not in memo:  # the array is kept with its digest: its memory is not reused while the block lasts
        memo[key] = (array, _digest(array, digest_size))
    return memo[key][1]


def _digest(array, digest_size: int) -> bytes:
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    if len(data) <= CHUNK_BYTES:
        return hashlib.blake2b(data, digest_size=digest_size).digest()
    chunks = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
    digests = _threads().map(lambda chunk: hashlib.blake2b(chunk, digest_size=digest_size).digest(), chunks)
    combined = hashlib.blake2b(digest_size=digest_size, person=b"chunks4M")
    combined.update(len(data).to_bytes(8, "little"))
    for digest in digests:
        combined.update(digest)
    return combined.digest()
