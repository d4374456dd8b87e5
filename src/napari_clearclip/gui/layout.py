"""Qt details of the dock: text that wraps without widening it, captions above their text."""

from __future__ import annotations

from magicgui.widgets import Container, Label, ProgressBar
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy


def wrapping(label: Label, rich: bool = False) -> Label:
    """A label whose text wraps inside the dock and never widens it, however long the message."""
    native = label.native
    native.setWordWrap(True)
    policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
    policy.setHeightForWidth(True)
    native.setSizePolicy(policy)
    native.setMinimumSize(1, 1)   # its height follows its width (Qt's guess at a narrow one left blank space below)
    native.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
    native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
    return label


def lines_high(edit, lines: int):
    """A text box as high as ``lines`` lines of text (it scrolls past them), so that it does not take the dock's
    spare height and push the rest of the form off a laptop screen."""
    native = edit.native
    frame = native.frameWidth() * 2 + int(native.document().documentMargin() * 2)
    native.setFixedHeight(native.fontMetrics().lineSpacing() * lines + frame + 2)
    return edit


def captioned(name: str, caption: str, text: Label, *below) -> Container:
    """A caption on its own line with its text (and any widgets ``below``) under it, in a form row of its own whose
    caption is blank (not a form caption floating beside a long text, nor a second caption)."""
    title = Label(value=caption)
    title.native.setStyleSheet("font-weight: bold")
    box = Container(name=name, label=" ", widgets=[title, text, *below], labels=False)
    box.native.layout().setContentsMargins(0, 4, 0, 0)
    box.native.layout().setSpacing(2)
    return box


def scrolling(form: Container) -> QScrollArea:
    """The form in a vertical scroll area: the dock fits a laptop screen with every section open, and no
    message, legend or opened section can make napari's window grow."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(form.native)
    area.setMinimumWidth(form.native.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width())
    return area


def run_progress_bar() -> ProgressBar:
    """The run's progress, in the dock: a plain bar that repaints only when a run reports progress.

    napari's own progress bars show an animated indicator in the status bar while any is open. Each of its
    frames repaints the window, which napari's OpenGL canvas makes an OpenGL composition of the whole
    window: on software OpenGL (remote desktops, virtual machines, Xvfb) that kept a CPU core about 10%
    busy, and PyTorch's threads, waiting on each other, ran runs 25-35% slower on a 2-core machine.
    Hidden between runs, its place kept, so that the dock does not move when a run starts.
    """
    bar = ProgressBar(name="progress_bar", min=0, max=1000, value=0, visible=False)
    policy = bar.native.sizePolicy()
    policy.setRetainSizeWhenHidden(True)
    bar.native.setSizePolicy(policy)
    bar.native.setTextVisible(False)
    bar.native.setMaximumHeight(8)
    return bar
