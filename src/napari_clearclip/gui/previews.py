"""Parts of a re-run's labels shown before the run ends (live mode on large images).

The worker yields what is final already (tiles of one class throughout that change class at
once, then the view or the region around the newest stroke, then the rest nearest first); this
writes it into the result layer at most every PREVIEW_INTERVAL_MS, one refresh for all that
came meanwhile: the first two parts in view (the tiles of one class throughout that change class, then
the view, tens of milliseconds later) are written at once, and so is a part that comes after a quiet
interval or after parts out of view alone (they cost no refresh). Pixels the user painted, before or
during the run, are never written; a run that is cancelled or fails puts back what its previews
wrote, so that it changes nothing.

Parts out of view are written into the layer's array but not shown yet: showing a 2-D layer redraws all of
it (tens of milliseconds on the GUI thread, more with software OpenGL, and time the run does not get), and
the user does not see them. They are shown with the next part in view, when the view moves onto them, or by
the finished run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from qtpy.QtCore import QTimer

from ..editing import LabelsPreview, apply_preview, revert_previews, split_preview

#: How often previews are written into the layer, at most (ms): each write refreshes the whole layer.
PREVIEW_INTERVAL_MS = 150
#: Times a run shows new data before the interval applies: the first change (tiles of one class throughout) and the
#: view the user waits for, which comes tens of milliseconds later, are not held apart. (A large part is written over
#: several turns of the event loop and shown once.)
PREVIEW_BURST = 2
#: Pixels written in one turn of the event loop, at most: a larger preview is written over several turns.
PIXELS_PER_TURN = 1 << 21


class RunPreviews:
    """The previews of one run into ``target`` (a ResultLayer), with ``found`` (plane -> the plane as the run
    found it)."""

    def __init__(self, target, found: dict, view: Callable[[], tuple | None] | None = None):
        """``view``: (top, bottom, left, right) of the 2-D layer's pixels in view now, None where unknown (every
        part is then shown as it is written)."""
        self.target, self.found = target, found
        self.expected: dict = {}   # plane -> the plane as the previews left it (what the finished run expects)
        self.written = 0
        self._queue: list[LabelsPreview] = []
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.flush)
        self._last_write: float | None = None   # time.monotonic() of the last write of a part in view
        self._shown = 0                          # writes of parts in view finished (each then shown once)
        self._view = view
        self.unshown: list[tuple] = []           # the boxes written since the layer last showed its data
        self._view_timer = QTimer()               # a moved view shows what is unshown at most every interval
        self._view_timer.setSingleShot(True)
        self._view_timer.timeout.connect(self._show_if_seen)

    def _writable_data(self):
        data = self.target.layer.data
        if isinstance(data, np.ndarray) and data.flags.writeable and data.shape == self.target.baseline.shape:
            return data
        return None

    def add(self, preview: LabelsPreview) -> None:
        """Queue a preview: written at once when the interval has passed since the last write of a part in view (the
        first PREVIEW_BURST of those, always), else with whatever else comes until it has. Parts out of view cost no
        refresh, so they do not hold back the next part: the view the user waits for comes as soon as it is final."""
        self._queue.append(preview)
        if self._timer.isActive():
            return
        since = None if self._last_write is None else (time.monotonic() - self._last_write) * 1000
        if since is None or since >= PREVIEW_INTERVAL_MS or self._shown < PREVIEW_BURST:
            self.flush()
        else:
            self._timer.start(max(1, int(PREVIEW_INTERVAL_MS - since)))

    def flush(self) -> None:
        """Write the queued previews, PIXELS_PER_TURN at most (the rest on the next turns of the event loop), then
        refresh the layer once, on a turn of its own (each of these steps is short)."""
        data = self._writable_data()
        if not self._queue or data is None:
            return
        # the baseline is written in place: the run read it before it made any preview
        budget = PIXELS_PER_TURN
        written = []
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
            self.unshown.append(preview.index)
            written.append(preview.index)
        if self._in_view(written):   # it will be shown: the next parts wait for the interval
            self._last_write = time.monotonic()
        if not self._queue and self._in_view(self.unshown):   # all written, and some in view: shown next turn
            self._shown += 1
        QTimer.singleShot(0, self.flush if self._queue else self._show_if_seen)

    def view_changed(self) -> None:
        """The user moved the view: show what was written out of it, if it is in view now (within an interval)."""
        if self.unshown and not self._view_timer.isActive():
            self._view_timer.start(PREVIEW_INTERVAL_MS)

    def _show_if_seen(self) -> None:
        """Show the layer's new data if any of what was written since it was last shown is in view."""
        if self.unshown and self._in_view(self.unshown):
            self._refresh()

    def _in_view(self, boxes: list[tuple]) -> bool:
        data = self._writable_data()
        try:
            view = None if self._view is None or data is None or data.ndim != 2 else self._view()
        except RuntimeError:  # the viewer closed meanwhile
            view = None
        if view is None:
            return True
        top, bottom, left, right = view
        return any(rows.start < bottom and rows.stop > top and columns.start < right and columns.stop > left
                   for rows, columns in (_box(index, data.shape) for index in boxes))

    def _refresh(self) -> None:
        self.unshown = []
        try:
            self.target.layer.refresh()
        except RuntimeError:  # the viewer closed meanwhile
            pass

    def stop(self, shown: bool = False) -> None:
        """No more previews (the run ended): nothing queued is written, and what was written out of view is shown
        now, unless the caller shows the layer itself (``shown``: the finished run writes its labels)."""
        self._queue = []
        self._timer.stop()
        self._view_timer.stop()
        if shown:
            self.unshown = []
        elif self.unshown:
            self._refresh()

    def revert(self) -> None:
        """The run was cancelled or failed: show what it found again where its previews wrote."""
        self.stop(shown=True)
        data = self._writable_data()
        if data is None or not self.expected:
            return
        revert_previews(data, self.target.baseline, self.expected, self.found)
        self.expected = {}
        self._refresh()


def _box(index: tuple, shape: tuple) -> tuple[slice, slice]:
    """The rows and columns (start and stop set) of a 2-D preview's index."""
    rows, columns = (slice(*part.indices(size)[:2]) for part, size in zip(index[-2:], shape[-2:]))
    return rows, columns
