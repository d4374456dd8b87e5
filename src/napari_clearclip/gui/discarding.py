"""Results segmented tile by tile whose layer the user removes: discarded, for as long as their viewer lives.

A result's store is in the user cache. When the user removes its layer, the result is marked discarded at once (no
run learns from it, even after napari closes) and its store removed in the background; not while a layer of a
viewer shows its labels, and not during a run (which may read it: it goes at the next run tile by tile). The
viewer is watched from the first dock opened in it on, also once that dock is closed. napari removes every layer
when it closes, before its window: removals are judged on the next turn of the event loop, and none once the
viewer's main window is hidden with no layer left, so that the results a closed napari left teach the next run on
their image. A viewer never shown (``show=False``, in scripts) keeps its other layers when one is removed: that
removal is the user's.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Callable

from napari.layers import Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QMainWindow

from ..labels_cache import discard_result, in_labels_folder, remove_stores

#: The viewers watched (a dock was opened in them): their layers are those that may show a result.
_VIEWERS: "weakref.WeakSet" = weakref.WeakSet()
#: Each watched viewer's main window (a weak reference), found through its dock once docked: not shown, napari
#: is closing.
_WINDOWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def watch(viewer, record_key: str, running: Callable[[], bool]) -> None:
    """Discard the results (layers whose metadata ``record_key`` names a store) removed from ``viewer`` from now on,
    once per viewer. ``running``: whether a run that may read a result is going."""
    if viewer in _VIEWERS:
        return
    _VIEWERS.add(viewer)
    viewer_ref = weakref.ref(viewer)

    def removed(event) -> None:
        layer = getattr(event, "value", None)
        kept = layer.metadata.get(record_key) if isinstance(layer, Labels) else None
        if isinstance(kept, dict) and kept.get("store"):
            store = Path(kept["store"])
            going = running()   # (a run whose thread ended, the dock not yet told, is one going)
            QTimer.singleShot(0, lambda: _discard(store, viewer_ref, record_key, lambda: going or running()))

    viewer.layers.events.removed.connect(removed)


def note_window(viewer, widget) -> None:
    """Remember ``viewer``'s main window, from a widget docked in it (a floating one tells nothing)."""
    try:
        window = widget.window()
    except RuntimeError:   # Qt deleted the widget
        return
    if isinstance(window, QMainWindow):
        _WINDOWS[viewer] = weakref.ref(window)   # (napari's own, never kept alive here)


def shown_stores(record_key: str) -> set[str]:
    """The stores of results that a layer of a watched viewer shows: by its record, or by its data (a result's labels
    given to another layer, in napari's console say)."""
    shown = set()
    for viewer in list(_VIEWERS):
        for item in viewer.layers:
            kept = item.metadata.get(record_key)
            if isinstance(kept, dict) and kept.get("store"):
                shown.add(str(Path(kept["store"])))
            for data in (item.data if getattr(item, "multiscale", False) else [item.data]):
                root = getattr(getattr(data, "store", None), "root", None)
                if root is not None:
                    shown.add(str(Path(root)))
    return shown


def _discard(store: Path, viewer_ref, record_key: str, running: Callable[[], bool]) -> None:
    viewer = viewer_ref()
    window = None if viewer is None or viewer not in _WINDOWS else _WINDOWS[viewer]()
    try:
        if window is None:   # (never seen docked)
            return
        if not window.isVisible() and not len(viewer.layers):   # napari is closing: its layers all gone, then its
            return                                               # window hidden (one never shown keeps the others)
    except RuntimeError:   # Qt deleted the window: napari closed
        return
    if str(store) in shown_stores(record_key) or not in_labels_folder(store):
        return
    going = running()

    def discard():
        discard_result(store)
        if not going:
            remove_stores([store])

    threading.Thread(target=discard, name="napari-clearclip removing results", daemon=True).start()
