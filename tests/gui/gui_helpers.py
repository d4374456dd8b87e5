"""Driving the widget in tests: run and wait, and watching the GUI thread for stalls."""

from __future__ import annotations

import time

import numpy as np

TIMEOUT = 240_000   # ms: a run on a loaded 2-core machine


def run_and_wait(qtbot, widget):
    """Press Run and wait for the run to end; the worker, for its signals."""
    worker = widget.run()
    assert worker is not None, widget.status.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    return worker


class TickRecorder:
    """Records when the Qt event loop gets to run a 10 ms timer: long gaps are GUI stalls."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.ticks = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()

    @property
    def longest_gap(self) -> float:
        return float(np.diff(self.ticks).max())
