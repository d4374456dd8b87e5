"""Large arrays that a run writes once from end to end (labels, margins), mapped in the processor's small pages.

NumPy asks Linux for huge pages (2 MiB) for every array of 4 MiB or more. Where a huge page is not ready at hand
(a virtual machine whose host backs it in small pages, memory in pieces after a model was loaded), the first write
to each waits while the kernel assembles one: re-opening a stored 4096 x 4096 image, filling its labels and margins
(50 MB of fresh memory) took 0.05-0.09 s in huge pages against 0.02 s in small ones, on the same machine, run after
run; the whole re-open 0.13-0.17 s against 0.09-0.10 s. Small pages cost a fault per 4 KiB, which is steady.
Elsewhere (other systems, small arrays) these are NumPy's own arrays.
"""

from __future__ import annotations

import functools
import mmap
from pathlib import Path

import numpy as np

#: Arrays smaller than this are NumPy's own (NumPy asks for huge pages from 4 MiB on).
SMALL_PAGES_FROM = 4 << 20

_NO_HUGE_PAGES = getattr(mmap, "MADV_NOHUGEPAGE", None)
_POPULATE = getattr(mmap, "MAP_POPULATE", None)
#: Linux 5.14 and later: every page of a mapping mapped now, for writing (older kernels refuse it: mapped as written)
_MADV_POPULATE_WRITE = 23


@functools.lru_cache(maxsize=1)
def _huge_pages_always() -> bool:
    """Whether Linux gives huge pages to every large mapping, not only to those that ask (then a mapping made whole
    at once would get them: it is told not to first)."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def empty(shape, dtype, written_whole: bool = False) -> np.ndarray:
    """An uninitialised C-ordered array, in small pages where it is large and the system can be asked for them;
    ``written_whole``: every page mapped at once (one call, where a fault a page took 1.5-2 times as long here)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    count = int(np.prod(shape, dtype=np.int64))
    if _NO_HUGE_PAGES is None or count * dtype.itemsize < SMALL_PAGES_FROM:
        return np.empty(shape, dtype)
    if written_whole and _POPULATE is not None and not _huge_pages_always():
        memory = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    else:
        memory = mmap.mmap(-1, count * dtype.itemsize)
        _advise(memory, _NO_HUGE_PAGES)
        if written_whole:
            _advise(memory, _MADV_POPULATE_WRITE)
    # the mapping is the array's own base, as NumPy's memory is an array's own: a view of it refers to this array
    return np.ndarray(shape, dtype, buffer=memory)


def owns_its_memory(array: np.ndarray) -> bool:
    """Whether ``array`` holds its memory itself (NumPy's own, or made by :func:`empty`), so that every view of
    it counts as a reference to it."""
    return array.flags.owndata or (type(array) is np.ndarray and isinstance(array.base, mmap.mmap))


def _advise(memory: mmap.mmap, advice: int) -> None:
    try:
        memory.madvise(advice)
    except OSError:  # a kernel without that advice (or without huge pages): its pages come as they are written
        pass
