"""Live mode: run again by itself when a stroke ends or a moment after the last keystroke, the newest request
winning."""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Callable

from qtpy.QtCore import QTimer

from .worker_errors import errors_reported

_log = logging.getLogger(__name__)

#: Live re-runs wait this long after the last keystroke (a stroke runs at once: napari reports it when it ends).
LIVE_DELAY_MS = 300


class LiveMode:
    """Debounced re-runs: at most one run in flight, and one more queued behind it (the newest request wins).

    ``enabled()`` says whether Live is on, ``busy()`` whether a run is computing, ``ready()``
    whether the fields make a run (a half-typed class list does not), ``start()`` starts one.
    """

    def __init__(self, enabled: Callable[[], bool], busy: Callable[[], bool], ready: Callable[[], bool],
                 start: Callable[[], object]):
        self._enabled, self._busy, self._ready, self._start = enabled, busy, ready, start
        self.pending = False               # a re-run asked for while one is running
        self._closed = False
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(LIVE_DELAY_MS)
        self._timer.timeout.connect(self.run_now)

    def trigger(self, *_) -> None:
        """Something changed: run after the delay (typing or painting on postpones it)."""
        if self._enabled() and not self._closed:
            _safely(self._timer.start)

    def stroke_ended(self, *_) -> None:
        """A stroke, undo or redo ended (napari reports a stroke once, when the mouse is released): run at
        once, or right after the run in flight. The delay is for typing, where every keystroke reports."""
        if self._enabled() and not self._closed:
            _safely(self._timer.stop)
            QTimer.singleShot(0, self.run_now)

    def run_now(self) -> None:
        """Run now, or as soon as the run in flight ends."""
        if self._closed or not self._enabled():
            return
        if self._busy():
            self.pending = True
            return
        if self._ready():
            self._start()

    def run_finished(self) -> None:
        """A run ended: start the one asked for meanwhile, if any."""
        if self.pending and not self._closed:
            self.pending = False
            QTimer.singleShot(0, self.run_now)

    def close(self) -> None:
        """Stop for good; safe to call twice and after Qt deleted the timer."""
        self._closed = True
        self.pending = False
        _safely(self._timer.stop)


def _safely(call) -> None:
    try:
        call()
    except RuntimeError:  # the wrapped C++ object is already gone (closing down)
        pass


class Readying:
    """Readies the next re-run in a thread worker while nothing runs (``ready_job``: the snapping weights the
    first run did not need and memory for the re-run's copies), so that the first stroke after a run (with Live on;
    or the Run pressed after painting, with Learn from my edits on) answers as quickly as the later ones. Started
    when a run ends, stopped as soon as another starts (between two bands of rows: tens of milliseconds); it shows
    nothing and changes no result."""

    def __init__(self):
        self._worker = None
        self._jobs = 0                    # jobs whose generator runs (a stopped one ends its band)
        self._idle = threading.Condition()
        _readying.add(self)

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, job: Callable, *args) -> None:
        from napari.qt.threading import create_worker

        self.stop()

        @errors_reported
        def body():
            with self._idle:
                self._jobs += 1
            try:
                return (yield from job(*args))
            finally:
                with self._idle:
                    self._jobs -= 1
                    self._idle.notify_all()
        worker = create_worker(body, _start_thread=False, _ignore_errors=True)
        worker.errored.connect(lambda exc: _log.warning("Readying the next re-run failed: %s", exc))

        def finished():
            if self._worker is worker:
                self._worker = None
        worker.finished.connect(finished)
        self._worker = worker
        worker.start()

    def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            _safely(worker.quit)

    def _stop_at_exit(self) -> None:
        """Python is exiting with a job still going (a script that ends without closing its viewer): stop it and let
        it end its band (tens of milliseconds), before the Qt objects it reports to are gone."""
        self.stop()
        with self._idle:
            ended = self._idle.wait_for(lambda: self._jobs == 0, timeout=2.0)
        if ended:   # its thread still reports the job's end to Qt: let it finish before Python and Qt finalise
            from qtpy.QtCore import QThreadPool

            QThreadPool.globalInstance().waitForDone(1000)


_readying: "weakref.WeakSet[Readying]" = weakref.WeakSet()


@atexit.register
def _stop_readying_at_exit() -> None:
    for readying in list(_readying):
        readying._stop_at_exit()
