"""What must happen before torch is imported: GNU OpenMP's spinning shortened, and Triton loaded with its own symbols.

Load Triton with its own symbols first, so torch can be imported after napari has started.

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


#: Pauses GNU OpenMP's threads spin for after each of PyTorch's parallel operations before they sleep, where the user
#: has not chosen (libgomp's own default is 300,000, milliseconds of a core). Edge snapping's compiled loops run on
#: threads of their own between PyTorch's operations; on a machine with few cores the spinning threads held the
#: cores those loops needed (six strokes on 4096 x 4096 images took 5-20% longer, a class typed up to 35%). Text
#: encoding, a chain of small operations, is about 40 ms slower for two classes; image encoding is not measurably.
OPENMP_SPIN_COUNT = "3000"


def shorten_openmp_spin() -> None:
    """Set ``GOMP_SPINCOUNT`` to :data:`OPENMP_SPIN_COUNT` before torch loads GNU OpenMP, unless torch is already
    imported (too late to matter) or the user set it or ``OMP_WAIT_POLICY``."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
