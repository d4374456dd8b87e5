"""Running batches on dask.distributed: one model per worker process, images (or planes) as tasks.

Nothing here imports dask until it is asked for: ``pip install "napari-clearclip[distributed]"``
brings it. A local cluster (``--cluster local:N``), a running scheduler
(``--scheduler tcp://host:8786``, started with ``dask scheduler`` / ``dask worker`` or by
dask-jobqueue) and a ``distributed.Client`` from a notebook all run the same tasks.
"""

from __future__ import annotations

import os
import socket
import threading

from ..errors import DistributedMissingError, InvalidOptionError, SchedulerUnreachableError
from ..models import ModelSpec

EXTRA = 'pip install "napari-clearclip[distributed]"'
#: Memory a worker process needs at least (a ViT-B/16 with its buffers), to bound ``--cluster local:N``.
WORKER_MEMORY_BYTES = 1 << 30
#: Seconds to open a TCP connection to a scheduler before calling it unreachable.
CONNECT_SECONDS = 3.0
#: Seconds a scheduler has to start its handshake once connected (dask's side speaks first).
HANDSHAKE_SECONDS = 5.0
#: Seconds the whole connection, handshake and registration included, may take.
CLIENT_SECONDS = 20.0


def require_distributed():
    """The ``distributed`` module, or an error that names the extra to install."""
    try:
        import distributed
    except ImportError:
        raise DistributedMissingError(
            f"Running on a dask cluster needs dask.distributed, which is not installed: {EXTRA}") from None
    return distributed


_SEGMENTERS: dict = {}
_LOCK = threading.Lock()
LOADS = {"count": 0}  # how many models this process has loaded (one per worker is the point)


def segmenter_for(spec: ModelSpec):
    """This process's Segmenter for ``spec``: loaded by the first task on a worker, reused by every later one."""
    from ..segmenter import Segmenter

    with _LOCK:
        segmenter = _SEGMENTERS.get(spec)
        if segmenter is None:
            # a batch labels each image once: no re-run would use the edge-snapping weights of the last one
            segmenter = Segmenter(spec.model, spec.pretrained, method=spec.method, device=spec.device,
                                  precision=spec.precision, affinity_cache_bytes=0)
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


def total_memory() -> int | None:
    """This machine's physical memory in bytes, or None where it cannot be told."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def max_local_workers() -> int:
    """How many worker processes this machine can hold: one per core, each with its own model in memory."""
    cores = os.cpu_count() or 1
    memory = total_memory()
    by_memory = cores if memory is None else max(1, memory // WORKER_MEMORY_BYTES)
    return max(1, min(cores, by_memory))


def parse_cluster(text: str) -> int:
    """``local`` or ``local:N`` -> N worker processes (default: one per two cores, at least one).

    N above :func:`max_local_workers` is refused: each worker loads its own model, so more
    processes than cores (or than memory holds) only thrash.
    """
    name, _, count = str(text).strip().partition(":")
    if name != "local":
        raise InvalidOptionError(f"--cluster {text!r} is not known: use local or local:N (N worker processes), "
                                 "or --scheduler ADDRESS for a running cluster.")
    if not count:
        return max(1, (os.cpu_count() or 2) // 2)
    if not count.isdigit() or int(count) < 1:
        raise InvalidOptionError(f"--cluster {text!r}: N must be a whole number of at least 1.")
    workers, limit = int(count), max_local_workers()
    if workers > limit:
        memory = total_memory()
        gib = f" and {memory / 2**30:.0f} GiB of memory" if memory else ""
        raise InvalidOptionError(
            f"--cluster {text!r} asks for {workers} worker processes, but this machine has {os.cpu_count() or 1} "
            f"cores{gib}: use at most local:{limit} (one worker per core, each holding its own model in about "
            f"{WORKER_MEMORY_BYTES >> 30} GiB), or --scheduler for a larger cluster.")
    return workers


def parse_scheduler_address(address: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``tcp://host:port`` (or ``host:port``, or ``tls://...``), or a ValueError that says why."""
    text = str(address).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")
    if scheme not in ("tcp", "tls") or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidOptionError(
            f"--scheduler {address!r} is not a scheduler address: give it as tcp://HOST:PORT, e.g. "
            "tcp://127.0.0.1:8786 (dask scheduler prints its address when it starts).")
    return scheme, host, int(port)


def check_scheduler(address: str, connect_seconds: float = CONNECT_SECONDS,
                    handshake_seconds: float = HANDSHAKE_SECONDS) -> None:
    """Fail fast where no dask scheduler can answer: nothing listens, the host is unreachable, or another
    kind of server answers (a dask scheduler speaks first on a new connection; a web server waits)."""
    scheme, host, port = parse_scheduler_address(address)
    try:
        connection = socket.create_connection((host, port), timeout=connect_seconds)
    except socket.timeout:
        raise SchedulerUnreachableError(
            f"No dask scheduler answered at {address} within {connect_seconds:.0f} s: check the address and that "
            "the scheduler is running and reachable from here.") from None
    except OSError as exc:
        raise SchedulerUnreachableError(
            f"Could not reach the dask scheduler at {address} ({exc.strerror or exc}): check the address and that "
            "the scheduler is running.") from None
    if scheme != "tcp":
        connection.close()
        return  # TLS: the handshake is the TLS library's, checked by the client with its deadline
    with connection:
        connection.settimeout(handshake_seconds)
        try:
            first = connection.recv(1)
        except OSError:
            first = b""
    if not first:
        raise SchedulerUnreachableError(
            f"Something listens at {address}, but it is not a dask scheduler (it sent no dask handshake within "
            f"{handshake_seconds:.0f} s): check the port; dask scheduler prints its address when it starts.")


def connect_client(address: str, seconds: float = CLIENT_SECONDS):
    """A ``distributed.Client`` for a running scheduler, or an error within ``seconds`` (never a hang)."""
    distributed = require_distributed()
    check_scheduler(address)
    outcome: dict = {}

    def connect() -> None:
        try:
            outcome["client"] = distributed.Client(address, timeout=f"{max(1, int(seconds) - 2)}s")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="clearclip-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise SchedulerUnreachableError(
            f"The dask scheduler at {address} did not complete the connection within {seconds:.0f} s: check that "
            "the address is a dask scheduler and that its version matches this one's "
            f"(distributed {distributed.__version__}).")
    if "error" in outcome:
        exc = outcome["error"]
        raise SchedulerUnreachableError(f"Could not connect to the dask scheduler at {address}: {exc}") from None
    return outcome["client"]


def start_client(cluster: str | None = None, scheduler: str | None = None):
    """A ``(client, cluster)`` pair for the CLI: a new LocalCluster, or a connection to a running scheduler.

    A local cluster gets N worker processes sharing the cores (torch threads are set per
    worker to its share), so N workers never oversubscribe the machine. Bad addresses and
    counts are ValueErrors, unreachable schedulers ConnectionErrors, both before anything starts.
    """
    if scheduler:
        parse_scheduler_address(scheduler)
        return connect_client(scheduler), None
    workers = parse_cluster(cluster or "local")
    distributed = require_distributed()
    threads = max(1, (os.cpu_count() or 1) // workers)
    local = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None, env={"OMP_NUM_THREADS": str(threads)})
    client = distributed.Client(local)
    client.run(_set_torch_threads, threads)
    return client, local


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
