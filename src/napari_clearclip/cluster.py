"""Running batches on dask.distributed: one model per worker process, images (or planes) as tasks.

Nothing here imports dask until it is asked for: ``pip install "napari-clearclip[distributed]"``
brings it. A local cluster (``--cluster local:N``), a running scheduler
(``--scheduler tcp://host:8786``, started with ``dask scheduler`` / ``dask worker`` or by
dask-jobqueue) and a ``distributed.Client`` from a notebook all run the same tasks.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from .errors import ClearClipError

EXTRA = 'pip install "napari-clearclip[distributed]"'


class DistributedMissingError(ClearClipError, ImportError):
    """dask.distributed is needed for this and is not installed."""


def require_distributed():
    """The ``distributed`` module, or an error that names the extra to install."""
    try:
        import distributed
    except ImportError:
        raise DistributedMissingError(
            f"Running on a dask cluster needs dask.distributed, which is not installed: {EXTRA}") from None
    return distributed


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build the same Segmenter as every other worker."""

    model: str = "ViT-B-16"
    pretrained: str | None = None
    method: str = "clearclip"
    device: str = "auto"
    precision: str = "auto"


_SEGMENTERS: dict = {}
_LOCK = threading.Lock()
LOADS = {"count": 0}  # how many models this process has loaded (one per worker is the point)


def segmenter_for(spec: ModelSpec):
    """This process's Segmenter for ``spec``: loaded by the first task on a worker, reused by every later one."""
    from .segmenter import Segmenter

    with _LOCK:
        segmenter = _SEGMENTERS.get(spec)
        if segmenter is None:
            segmenter = Segmenter(spec.model, spec.pretrained, method=spec.method, device=spec.device,
                                  precision=spec.precision)
            _SEGMENTERS[spec] = segmenter
            LOADS["count"] += 1
        return segmenter


def worker_name() -> str:
    """The dask worker's address inside a task, else this host and process."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"


def parse_cluster(text: str) -> int:
    """``local`` or ``local:N`` -> N worker processes (default: one per two cores, at least one)."""
    name, _, count = text.partition(":")
    if name != "local":
        raise ClearClipError(f"--cluster {text!r} is not known: use local or local:N (N worker processes), "
                             "or --scheduler ADDRESS for a running cluster.")
    if not count:
        return max(1, (os.cpu_count() or 2) // 2)
    if not count.isdigit() or int(count) < 1:
        raise ClearClipError(f"--cluster {text!r}: N must be a whole number of at least 1.")
    return int(count)


def start_client(cluster: str | None = None, scheduler: str | None = None):
    """A ``(client, cluster)`` pair for the CLI: a new LocalCluster, or a connection to a running scheduler.

    A local cluster gets N worker processes sharing the cores (torch threads are set per
    worker to its share), so N workers never oversubscribe the machine.
    """
    distributed = require_distributed()
    if scheduler:
        try:
            return distributed.Client(scheduler, timeout="20s"), None
        except OSError as exc:
            raise ClearClipError(f"Could not reach the dask scheduler at {scheduler}: {exc}") from None
    workers = parse_cluster(cluster or "local")
    threads = max(1, (os.cpu_count() or 1) // workers)
    local = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None, env={"OMP_NUM_THREADS": str(threads)})
    client = distributed.Client(local)
    client.run(_set_torch_threads, threads)
    return client, local


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
