"""Files that are either complete or absent: every result dmm writes goes through :func:`atomic_write`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or an exception mid-write leaves ``path`` as it was (absent or the previous complete file)
    and no temporary file behind; the rename is atomic on POSIX file systems.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
