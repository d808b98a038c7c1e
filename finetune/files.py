"""Writing a file so that it is either whole or not there: the one way every output is written.

Without torch, so the dataset tools can use it without loading the model package.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from moondream2.errors import DiskFull, is_disk_full


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write through a temporary file in the same directory and rename it, so a crash, Ctrl-C or a
    full disk never leaves a half-written checkpoint under the final name. A full disk is a one-line
    `DiskFull` naming the file; the temporary file is removed and any earlier file at `path` is kept."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err):
            raise DiskFull(path, " (any earlier version of it is kept)") from None
        raise
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return path
