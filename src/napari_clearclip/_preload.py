"""Load Triton with its own symbols first, so torch can be imported after napari has started.

torch imports Triton, whose library embeds LLVM. When napari's OpenGL runs on Mesa's
software renderer (llvmpipe: headless machines, remote desktops, virtual machines),
Mesa's LLVM is already loaded, and the two clash: the process crashes the moment the
plugin is opened. Loading Triton with RTLD_DEEPBIND makes it resolve LLVM within
itself. Nothing happens when torch is already imported or Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def preload_triton() -> None:
    if "torch" in sys.modules or "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return
    try:
        if importlib.util.find_spec("triton") is None:
            return
    except (ImportError, ValueError):
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # a broken Triton only disables torch's compiler, never the plugin
        pass
    finally:
        sys.setdlopenflags(flags)
