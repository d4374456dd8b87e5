"""The napari side: the dock widget and its parts, sample data and saved settings.

Nothing here computes: the widget collects the fields, runs the engine in a napari thread
worker, shows progress and sets layers.
"""

from .widget import ClearClipWidget

__all__ = ["ClearClipWidget"]
