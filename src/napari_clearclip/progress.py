"""The one shape of progress every run reports, and the one way to drive a progress generator.

Engine runs are generators: they yield :class:`Progress` and return their result, so a
caller can show progress and cancel between batches (the widget runs them in a napari
thread worker, as stardist-napari runs its plain generator core). :func:`run_to_end`
drives one to its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Generator, TypeVar

T = TypeVar("T")

#: Where edge snapping starts within a plane's share of a progress bar.
EDGE_SNAPPING_START = 0.5
STAGE_WORDS = {"loading": "loading the model", "text": "class names encoded", "windows": "windows",
               "edges": "snapping to edges", "foreground": "foreground map (FOUND)",
               "tiles": "tiles", "reading": "reading the image",
               "statistics": "reading the whole image for the lesson (windows)",
               "objects": "giving each object its class (tiles)",
               "weights": "readying edge snapping for the next stroke"}


@dataclass(frozen=True)
class Progress:
    """One step of a run: ``stage`` ("loading", "reading", "text", "windows", "foreground", "edges", "statistics",
    "tiles", "objects", or "weights": readying a re-run), ``done`` of
    ``total`` units,
    on plane ``plane`` of ``planes`` (stacks), with ``then_edges`` when edge snapping follows the windows;
    ``preview``: labels final before the run ends, to show meanwhile (see ``Segmenter.segment_steps(focus=)``)."""

    stage: str
    done: int
    total: int
    then_edges: bool = False
    plane: int = 0
    planes: int = 1
    detail: str = ""
    preview: object = field(default=None, compare=False, repr=False)

    @property
    def fraction(self) -> float:
        """Done of the whole run: windows take a plane's whole share, or its first half when edges are snapped after."""
        part = self.done / self.total if self.total else 0.0
        if self.stage == "windows":
            within = part * (EDGE_SNAPPING_START if self.then_edges else 1.0)
        elif self.stage == "edges":
            within = EDGE_SNAPPING_START + (1 - EDGE_SNAPPING_START) * part
        elif self.stage in ("tiles", "reading", "statistics", "objects", "weights"):
            within = part
        else:
            within = 0.0
        return (self.plane + within) / max(1, self.planes)

    @property
    def message(self) -> str:
        if self.detail:
            return self.detail
        prefix = f"slice {self.plane + 1}/{self.planes}, " if self.planes > 1 else ""
        return f"{prefix}{STAGE_WORDS.get(self.stage, self.stage)}: {self.done}/{self.total}"


def run_to_end(steps: Generator[object, None, T]) -> T:
    """Run a progress generator to its end and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def relabelled(steps: Generator, **changes) -> Generator:
    """Generator: ``steps`` with fields of each :class:`Progress` changed (e.g. its plane); returns what they return."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        if isinstance(step, Progress):
            fields = {k: v for k, v in changes.items() if k != "then_edges" or step.stage == "windows"}
            step = replace(step, **fields)
        yield step


def on_plane(steps: Generator, plane: int, planes: int) -> Generator:
    """Generator: the progress of one plane of ``planes``; returns what ``steps`` returns."""
    return relabelled(steps, plane=plane, planes=planes)
