"""Parts of a re-run's labels shown before the run ends (live mode on large images).

The worker yields what is final already (tiles of one class throughout that change class at
once, then the view or the region around the newest stroke, then the rest nearest first); this
writes it into the result layer at most every PREVIEW_INTERVAL_MS, one refresh for all that
came meanwhile: a preview that comes after a quiet interval (the view, once the tiles of one class
are shown) is written at once. Pixels the user painted, before or during the run, are never written; a run
that is cancelled or fails puts back what its previews wrote, so that it changes nothing.
"""

from __future__ import annotations

import time

import numpy as np
from qtpy.QtCore import QTimer

from ..editing import LabelsPreview, apply_preview, revert_previews, split_preview

#: How often previews are written into the layer, at most (ms): each write refreshes the whole layer.
PREVIEW_INTERVAL_MS = 150
#: Pixels written in one turn of the event loop, at most: a larger preview is written over several turns.
PIXELS_PER_TURN = 1 << 21


class RunPreviews:
    """The previews of one run into ``target`` (a ResultLayer), with ``found`` (plane -> the plane as the run
    found it)."""

    def __init__(self, target, found: dict):
        self.target, self.found = target, found
        self.expected: dict = {}   # plane -> the plane as the previews left it (what the finished run expects)
        self.written = 0
        self._queue: list[LabelsPreview] = []
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.flush)
        self._last_write: float | None = None   # time.monotonic() of the last write

    def _writable_data(self):
        data = self.target.layer.data
        if isinstance(data, np.ndarray) and data.flags.writeable and data.shape == self.target.baseline.shape:
            return data
        return None

    def add(self, preview: LabelsPreview) -> None:
        """Queue a preview: written at once when the interval has passed since the last write (the first, always),
        else with whatever else comes until it has."""
        self._queue.append(preview)
        if self._timer.isActive():
            return
        since = None if self._last_write is None else (time.monotonic() - self._last_write) * 1000
        if since is None or since >= PREVIEW_INTERVAL_MS:
            self.flush()
        else:
            self._timer.start(max(1, int(PREVIEW_INTERVAL_MS - since)))

    def flush(self) -> None:
        """Write the queued previews, PIXELS_PER_TURN at most (the rest on the next turns of the event loop), then
        refresh the layer once, on a turn of its own (each of these steps is short)."""
        data = self._writable_data()
        if not self._queue or data is None:
            return
        self._last_write = time.monotonic()
        # the baseline is written in place: the run read it before it made any preview
        budget = PIXELS_PER_TURN
        while self._queue and budget > 0:
            preview = self._queue.pop(0)
            if preview.labels.size > budget:   # the first rows now, the others next turn
                preview, rest = split_preview(preview, max(1, budget // preview.labels.shape[-1]))
                if rest is not None:
                    self._queue.insert(0, rest)
            budget -= preview.labels.size
            expected = self.expected.get(preview.plane)
            if expected is None:   # the plane's first preview brings a copy of it as the run found it
                found = preview.plane_found
                expected = self.expected[preview.plane] = (np.array(self.found[preview.plane], copy=True)
                                                           if found is None else found)
            self.written += apply_preview(data, self.target.baseline, expected, preview)
        QTimer.singleShot(0, self.flush if self._queue else self._refresh)

    def _refresh(self) -> None:
        try:
            self.target.layer.refresh()
        except RuntimeError:  # the viewer closed meanwhile
            pass

    def stop(self) -> None:
        """No more previews (the run ended): nothing queued is written."""
        self._queue = []
        self._timer.stop()

    def revert(self) -> None:
        """The run was cancelled or failed: show what it found again where its previews wrote."""
        self.stop()
        data = self._writable_data()
        if data is None or not self.expected:
            return
        revert_previews(data, self.target.baseline, self.expected, self.found)
        self.expected = {}
        self._refresh()
