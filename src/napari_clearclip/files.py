"""Writing files so that nothing partial is ever left: through a temporary file renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

#: Temporary files of unfinished writes end with this (a killed process may leave one; runs remove them).
PARTIAL_SUFFIX = ".partial"


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary path)`` in the same folder, then rename the result onto ``path``.

    Readers see the old file or the new one, never half of one; on any error (a full disk,
    Ctrl-C) the temporary file is removed and the error raised.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave a partial file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
