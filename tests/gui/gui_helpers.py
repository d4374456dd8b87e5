"""Driving the widget in tests: run and wait, and watching the GUI thread for stalls."""

from __future__ import annotations

import gc
import time

import numpy as np

TIMEOUT = 240_000   # ms: a run on a loaded 2-core machine


def blue_squares(seed: int = 7, red: bool = False) -> np.ndarray:
    """A noisy grey 192 x 192 RGB image with two blue squares (and with ``red`` a red one): the demo model does not
    know "debris", so a debris stroke on one blue square is what teaches it the other."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 8, (192, 192, 3)), 0, 255)
    image[24:72, 24:72] = image[120:168, 120:168] = (40, 70, 215)
    if red:
        image[120:168, 24:72] = (215, 35, 35)
    return image.astype(np.uint8)


def debris_result(qtbot, widget):
    """The demo model's result for "debris" and "background" on :func:`blue_squares`: its layer, "shapes classes"."""
    viewer = widget._viewer
    widget.switch_to_demo_model()
    widget.image.value = viewer.add_image(blue_squares(), name="shapes")
    widget.classes.value = "debris\nbackground"
    run_and_wait(qtbot, widget)
    return viewer.layers["shapes classes"]


def counted_runs(widget) -> list[float]:
    """The start time of every run from now on, pressed or started by Live mode, in a list that grows."""
    runs = []
    real_run = type(widget).run
    widget.__dict__["run"] = lambda *a: runs.append(time.perf_counter()) or real_run(widget)
    return runs


def run_and_wait(qtbot, widget):
    """Press Run and wait for the run to end; the worker, for its signals."""
    worker = widget.run()
    assert worker is not None, widget.status.value
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT)
    return worker


class TickRecorder:
    """Records when the Qt event loop gets to run a 10 ms timer: long gaps are GUI stalls. Also records how long
    each full garbage collection took meanwhile (they hold every thread, the GUI's included), for the message."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.ticks = []
        self.collections: list[float] = []
        self._started = 0.0
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def _collected(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self.collections.append(time.perf_counter() - self._started)

    def __enter__(self):
        gc.callbacks.append(self._collected)
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()
        gc.callbacks.remove(self._collected)

    @property
    def longest_gap(self) -> float:
        return float(np.diff(self.ticks).max())

    def describe(self) -> str:
        """The longest gap, with the full collections that ran meanwhile."""
        pauses = ", ".join(f"{pause * 1000:.0f}" for pause in self.collections) or "none"
        return f"GUI thread blocked for {self.longest_gap * 1000:.0f} ms (full garbage collections, ms: {pauses})"
